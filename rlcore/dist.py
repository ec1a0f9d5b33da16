"""Processes: the SPMD launch, the process group, and the few collectives the RL step needs.

`rlcore train ... trainer.nproc=N` re-runs itself under torchrun (`torch.distributed.run
--standalone`), so a launch by hand with torchrun (multi-node included) and the built-in launch are
the same code path. One rank per device: gloo on CPU, NCCL on CUDA. A single process needs no
process group and every collective here is then a no-op.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    """Several ranks in a process group. (One process may still have a group of its own: the vllm
    engine starts a 1-process one for its workers; rlcore leaves it to vLLM.)"""
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def launch(nproc: int, argv: list[str], *, env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()) -> int:
    """Run `rlcore <argv>` as nproc ranks under torchrun; returns its exit code. `pass_fds` stay open
    in torchrun (the run folder's lock). On Ctrl-C (which reaches torchrun and the ranks too, one
    process group) this waits for them to stop instead of killing torchrun, which would orphan the
    ranks, and stops relaying their stderr: torchrun answers SIGINT with a traceback of its own,
    while the launcher prints the one line that says where the run stopped."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "rlcore", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(_threads_per_rank(nproc))),
           **(env or {})}
    for fd in pass_fds:
        os.set_inheritable(fd, True)
    proc = subprocess.Popen(cmd, env=env, pass_fds=pass_fds, stderr=subprocess.PIPE)
    interrupted = threading.Event()
    relay = threading.Thread(target=_relay, args=(proc.stderr, interrupted), daemon=True)
    relay.start()
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        interrupted.set()
        proc.wait()  # a second Ctrl-C exits this process at once (rlcore.interrupts)
        raise
    relay.join()
    return code


def _relay(stream, interrupted: threading.Event) -> None:
    """Copy the ranks' stderr to ours, line by line, until an interrupt."""
    for line in iter(stream.readline, b""):
        if not interrupted.is_set():
            sys.stderr.buffer.write(line)
            sys.stderr.flush()


def _threads_per_rank(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // nproc)


def init(device: str) -> None:
    """Join the process group when running as one of several ranks (under torchrun)."""
    if world_size() == 1 or active():
        return
    if device == "cuda":
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if device == "cuda" else "gloo")


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a clean run the ranks first meet in a barrier, which waits for all
    of this rank's queued collectives: gloo work still in flight at interpreter exit aborts the process
    ("terminate called without an active exception", seen once in CI on a 2-rank test)."""
    if not active():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def exit_rank(code: int) -> None:
    """End this process with `code`. A torchrun rank (WORLD_SIZE > 1) ends by os._exit once stdio is
    flushed, after its work is saved and the groups are left (shutdown): at interpreter teardown gloo's
    threads, kept alive by FSDP's device meshes past destroy_process_group, can still abort the rank
    (SIGABRT, "terminate called without an active exception"; seen twice in CI on 2-rank tests, once
    after shutdown's barrier was added). Everything rlcore holds is closed explicitly before this."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's value of obj on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's obj, in rank order, on every rank ([obj] alone)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over all ranks (sum or max); the tensor itself when alone."""
    if active():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def any_rank(flag: bool) -> bool:
    """True when the flag is true on at least one rank (keeps loops of collectives in lockstep)."""
    return bool(all_reduce(torch.tensor([float(flag)]), "max").item())


# Metrics the ranks hold partial sums of (normalised by global counts): summed over ranks. Counts are
# summed too. Everything else is a per-rank mean, or the same on every rank: averaged.
_SUMMED = ("actor/pg_loss", "actor/entropy", "actor/kl", "actor/positive_nll", "actor/router_aux_loss",
           "actor/clipfrac", "actor/clipfrac_lower", "actor/clipfrac_upper", "actor/approx_kl", "actor/ratio_mean",
           "critic/value_loss", "critic/vf_clipfrac", "perf/generated_tokens", "reward/samples",
           "agent/tool_calls", "agent/tool_errors", "agent/tool_seconds")
_COUNTS = ("/errors", "/timeouts", "/no_step_samples")


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The step's metrics over all ranks: partial sums and counts summed, the rest averaged over the
    ranks that report the key."""
    if not active():
        return metrics
    gathered: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, metrics)
    out: dict[str, float] = {}
    for key in sorted({k for m in gathered for k in m}):
        values = [float(m[key]) for m in gathered if key in m]
        summed = key in _SUMMED or key.endswith(_COUNTS)
        out[key] = sum(values) if summed else sum(values) / len(values)
    return out
