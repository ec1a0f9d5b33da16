"""Model FLOPs utilisation on this machine, and the rlcore RL step by phase (time, FLOPs, memory).

    python bench/mfu.py [--threads N] [--reps 5] [--rl-steps 5] [--no-memory]

Prints one JSON line each:
  peak      fp32 torch.mm of square matrices (sizes --mm-sizes), best of --reps: 2 n^3 / seconds.
  train     forward+backward of the workload model (bench/workload.py) through rlcore's own scoring
            path (rlcore.logprobs.response_logprobs, entropy on, as in the update) on a batch of RL
            shape: 128 rows x (6 prompt + 32 response) tokens, no padding. Median of --reps after one
            warm-up. MFU = model FLOP/s / peak.
  rl_step   the real rlcore Trainer on the workload: median seconds per phase (the Timer's timing/*
            metrics) over --rl-steps after one warm-up, model FLOPs and MFU per phase.
  memory    one more step, instrumented (slower, not timed), per phase:
            rss_peak_mb: the process's peak resident set during the phase (Linux: /proc/self/clear_refs
              "5" resets VmHWM at phase start, VmHWM is read at the end). Not torch-aware: includes
              Python, the allocator's free lists and the engine's copy of the weights.
            alloc_peak_mb: peak bytes the torch CPU allocator had allocated above the phase start, from
              the profiler's memory events (torch.profiler profile_memory=True, the running sum of
              allocation/free sizes). torch has no CPU allocator statistics (torch.cpu has no
              memory_stats; torch.accelerator's are for accelerators only), so this is the torch-aware number.
            live_start_mb / live_end_mb: bytes of live tensors at phase start / end (gc scan of torch
              tensors, storages counted once: parameters, grads, optimizer state, batch tensors).

Model FLOPs (N = unique parameters, tied embedding counted once since it is the LM head matmul;
L = sequence length; l = layers; d = heads x head_dim):
  forward  per token: 2 N + 2 l d L      (the 2 l d L: causal QK^T and AV, 4 l d x average context L/2)
  fwd+bwd  per token: 6 N + 6 l d L      (backward = 2 x forward)
Generation counts its real tokens only (prompt prefill + sampled tokens); the logprobs/update phases count
prompt + response tokens, which is what they compute since issue 16 (packed forwards; the hf engine's
decode drops ended rows). padding_waste is what one right-padded grid (update) and a decode of every row
to the longest (generate) would have wasted. A phase that did not run (the old-log-prob forward under the
on-policy fast path) counts no FLOPs. The embedding lookup and the LM head on prompt positions (which rlcore skips) make
this count differ from the executed FLOPs by under 1% on this model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402  (puts the repo root on sys.path)

from rlcore.logprobs import response_logprobs  # noqa: E402
from rlcore.metrics import Timer  # noqa: E402
from rlcore.models import char_tokenizer  # noqa: E402

PROMPT_TOKENS = 6  # "37+45=": 2-digit addition prompts are 3-6 characters
MB = 2**20


# ------------------------------------------------------------------ peak and model throughput
def matmul_peak(sizes: list[int], reps: int) -> dict:
    per_size = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up
        best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
        per_size[n] = 2 * n**3 / best
    return {"peak_flops": max(per_size.values()),
            "per_size_gflops": {n: round(f / 1e9, 1) for n, f in per_size.items()}}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def model_shape(model) -> dict:
    c = model.config
    d = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    return {"num_params": workload.num_params(model), "layers": c.num_hidden_layers, "attn_dim": d}


def flops_per_token(shape: dict, seq_len: float, *, backward: bool) -> float:
    fwd = 2 * shape["num_params"] + 2 * shape["layers"] * shape["attn_dim"] * seq_len
    return 3 * fwd if backward else fwd


def train_throughput(reps: int, rows: int, peak: float) -> dict:
    tok = char_tokenizer()
    model = workload.build_model(tok).train()
    shape = model_shape(model)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, len(tok), (rows, PROMPT_TOKENS), generator=g).tolist()
    responses = torch.randint(2, len(tok), (rows, workload.MAX_NEW_TOKENS), generator=g)
    mask = torch.ones(rows, workload.MAX_NEW_TOKENS)

    def step():
        logp, entropy = response_logprobs(model, prompts, responses, mask, temperature=1.0,
                                          pad_id=tok.pad_token_id, with_entropy=True)
        loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    seconds = statistics.median(_timed(step) for _ in range(reps))
    seq_len = PROMPT_TOKENS + workload.MAX_NEW_TOKENS
    tokens = rows * seq_len
    flops = tokens * flops_per_token(shape, seq_len, backward=True)
    return {"batch": [rows, seq_len], "tokens": tokens, "seconds": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 1), "model_flops": flops,
            "achieved_gflops": round(flops / seconds / 1e9, 2), "peak_gflops": round(peak / 1e9, 1),
            "mfu": round(flops / seconds / peak, 4), **shape}


# ------------------------------------------------------------------ the RL step
class MemoryTimer(Timer):
    """rlcore's Timer, plus per-phase peak RSS, torch allocator peak and live tensor bytes."""

    def __init__(self):
        super().__init__()
        self.memory: dict[str, dict] = {}

    @contextmanager
    def __call__(self, name: str):
        live_start = live_tensor_bytes()
        _reset_peak_rss()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            with super().__call__(name):
                yield
        rss_peak = _peak_rss_bytes()
        self.memory[name] = {"rss_peak_mb": round(rss_peak / MB, 1),
                             "alloc_peak_mb": round(_alloc_peak_bytes(prof) / MB, 2),
                             "live_start_mb": round(live_start / MB, 2),
                             "live_end_mb": round(live_tensor_bytes() / MB, 2)}


def live_tensor_bytes() -> int:
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 (some tensor subclasses have no storage)
            continue
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def trace_events(prof) -> list[dict]:
    """The profiler's chrome-trace events (memory events included), through a temporary file."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)["traceEvents"]
    finally:
        os.remove(path)


def _alloc_peak_bytes(prof) -> int:
    events = trace_events(prof)
    current = peak = 0
    for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        if e["args"].get("Device Type", 0) == 0:  # CPU
            current += e["args"]["Bytes"]
            peak = max(peak, current)
    return peak


def step_tokens(trainer) -> dict:
    """Token counts of the step just run: prompts, generated, packed prompt+response, padded grid."""
    batch = trainer._last.batch
    prompt = [len(p) for p in batch.prompt_ids]
    response = batch.mask.sum(-1).long().tolist()
    packed = [p + r for p, r in zip(prompt, response)]
    return {"prompt": sum(prompt), "generated": sum(response), "packed": sum(packed),
            "padded_update_grid": len(packed) * max(packed),
            "generate_grid": len(response) * max(response), "seq_len_mean": sum(packed) / len(packed)}


def phase_flops(shape: dict, tokens: dict) -> dict[str, float]:
    L = tokens["seq_len_mean"]
    return {"generate": (tokens["prompt"] + tokens["generated"]) * flops_per_token(shape, L, backward=False),
            "logprobs": tokens["packed"] * flops_per_token(shape, L, backward=False),
            "update": tokens["packed"] * flops_per_token(shape, L, backward=True)}


def rl_step_breakdown(steps: int, peak: float, memory: bool) -> tuple[dict, dict | None]:
    trainer = workload.build_rlcore_trainer()
    shape = model_shape(trainer.actor.model)
    try:
        records = []
        for i in range(steps + 1):  # step 0: warm-up
            start = time.perf_counter()
            trainer.rl_step()
            seconds = time.perf_counter() - start
            trainer.step += 1
            timing = trainer.timer.pop()
            if i:
                records.append({"timing/step": seconds, **timing, "tokens": step_tokens(trainer)})
        phases = sorted({k for r in records for k in r if k.startswith("timing/")})
        med = {k.removeprefix("timing/"): statistics.median(r.get(k, 0.0) for r in records) for k in phases}
        tokens = {k: statistics.median(r["tokens"][k] for r in records) for k in records[0]["tokens"]}
        # Phases that ran: the on-policy fast path skips the old-log-prob forward (logprobs takes 0 s)
        flops = {k: v for k, v in phase_flops(shape, tokens).items() if med.get(k, 0.0) > 0}
        out = {"kind": "rl_step", "steps": steps, "threads": torch.get_num_threads(),
               "loadavg_1m": round(os.getloadavg()[0], 2),
               "seconds": {k: round(v, 4) for k, v in med.items()},
               "share": {k: round(v / med["step"], 3) for k, v in med.items() if k != "step"},
               "tokens": tokens,
               "padding_waste": {"update": round(1 - tokens["packed"] / tokens["padded_update_grid"], 3),
                                 "generate": round(1 - tokens["generated"] / tokens["generate_grid"], 3)},
               "model_gflops": {k: round(v / 1e9, 2) for k, v in flops.items()},
               "mfu": {k: round(flops[k] / med[k] / peak, 4) for k in flops},
               "mfu_step": round(sum(flops.values()) / med["step"] / peak, 4),
               "generated_tokens_per_s": round(tokens["generated"] / med["step"], 1)}
        mem = None
        if memory:
            trainer.timer = MemoryTimer()
            trainer.rl_step()
            mem = {"kind": "memory", **trainer.timer.memory}
        return out, mem
    finally:
        trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch default")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of the matmul and train measurements")
    parser.add_argument("--mm-sizes", type=int, nargs="+", default=[1024, 2048, 3072])
    parser.add_argument("--rows", type=int, default=workload.PROMPTS_PER_STEP * workload.SAMPLES_PER_PROMPT)
    parser.add_argument("--rl-steps", type=int, default=5, help="measured RL steps (after one warm-up)")
    parser.add_argument("--no-memory", action="store_true", help="skip the instrumented memory step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    peak = matmul_peak(args.mm_sizes, args.reps)
    print(json.dumps({"kind": "peak", "threads": torch.get_num_threads(), "loadavg_1m": round(os.getloadavg()[0], 2),
                      "peak_gflops": round(peak["peak_flops"] / 1e9, 1), **peak}), flush=True)
    train = train_throughput(args.reps, args.rows, peak["peak_flops"])
    print(json.dumps({"kind": "train", "threads": torch.get_num_threads(), **train}), flush=True)
    step, mem = rl_step_breakdown(args.rl_steps, peak["peak_flops"], memory=not args.no_memory)
    print(json.dumps(step), flush=True)
    if mem:
        print(json.dumps(mem), flush=True)


if __name__ == "__main__":
    main()
