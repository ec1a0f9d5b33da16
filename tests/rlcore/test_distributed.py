"""Several ranks (gloo on CPU, FSDP2): the update's math does not depend on the rank count, the CLI
launches ranks itself, and checkpoints move between rank counts."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_cli
from rlcore.checkpoint import checkpoint_dirs, load_checkpoint_model

pytestmark = pytest.mark.slow
WORKER = REPO / "tests" / "rlcore" / "dist_update_worker.py"


def run_worker(out, strategy, nproc, agg="token-mean", **env_extra):
    prefix = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "AGG": agg, **env_extra}
    proc = subprocess.run([sys.executable, *prefix, str(WORKER), str(out), strategy], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("strategy, agg", [("zero3", "token-mean"), ("zero2", "seq-mean-token-mean"),
                                           ("replicate", "seq-mean-token-sum-norm")])
def test_update_on_two_ranks_equals_one_rank(tmp_path, strategy, agg):
    """The same 8 samples, split 4 + 4 over two ranks, give the loss, gradient norm, gradients and
    parameters of one rank within 1e-5 relative. Gradients compare per tensor by relative norm (fp32
    sums in another order differ in the last bits); parameters over the whole model. Per tensor,
    Adam's first step (g / (|g| + eps)) makes a near-zero gradient element's last-bit difference a
    visible one, and a zero-initialised bias is nothing but that step: 5e-4 there (a k_proj bias
    measured 1.04e-4 with transformers 5.25, on the code of 2026-12-02 too: kernel order, not a bug).
    For zero3 the one rank trains on right-padded micro-batches and the two ranks packed: packing
    under FSDP changes nothing either. With two ranks the rows are spread by tokens first (rank 0's 29 tokens and rank 1's
    29 are regrouped), which changes nothing either."""
    one = run_worker(tmp_path / "one.pt", strategy, 1, agg, PACKING="0" if strategy == "zero3" else "1")
    two = run_worker(tmp_path / "two.pt", strategy, 2, agg)
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/clipfrac", "actor/approx_kl"):
        # abs: with symmetric advantages the pg loss cancels to ~1e-8, a sum of O(1) fp32 terms whose
        # order (ranks, head chunks) moves it by ~1e-7
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5, abs=1e-6), key
    assert one["metrics"]["actor/grad_norm"] > 0
    for name, a in one["grads"].items():
        rel = ((two["grads"][name] - a).norm() / a.norm().clamp(min=1e-12)).item()
        assert rel <= 1e-5, ("grad", name, rel)
    diff = sum((two["params"][n] - a).square().sum() for n, a in one["params"].items()).sqrt()
    assert (diff / sum(a.square().sum() for a in one["params"].values()).sqrt()).item() <= 1e-5  # whole model
    for name, a in one["params"].items():  # per tensor: a zero-initialised bias is all Adam update
        rel = ((two["params"][name] - a).norm() / a.norm().clamp(min=1e-12)).item()
        assert rel <= 5e-4, ("param", name, rel)
    # rows moved between the ranks by tokens (rlcore.balance) come back to their own rank, in order
    torch.testing.assert_close(two["logprobs"], one["logprobs"], rtol=1e-4, atol=1e-5)


def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Rank 1 alone computes a NaN loss: both ranks skip the optimizer step (the verdict is all-reduced),
    so the sharded weights stay the initial ones everywhere and the ranks stay in lockstep."""
    out = run_worker(tmp_path / "nan.pt", "zero3", 2, NAN_RANK="1")
    assert out["metrics"]["actor/skipped_steps"] == 1.0
    for name, a in out["initial"].items():
        assert torch.equal(out["params"][name], a), name


SHORT = ["model.warmstart.steps=0", "train.prompts_per_step=8", "rollout.samples_per_prompt=4",
         "rollout.max_new_tokens=6", "data.task.num_train=200", "data.task.num_eval=16", "trainer.sample_text_every=0",
         "train.max_tokens_per_microbatch=64", "data.max_prompt_tokens=16"]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_rank_quickstart_trains_syncs_checkpoints_and_exports(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", *SHORT, "trainer.nproc=2", "trainer.total_steps=3", "trainer.save_every=2",
                   f"trainer.output_dir={run}", cwd=tmp_path)
    assert "x 2 ranks (zero3)" in proc.stderr and "held-out accuracy" in proc.stdout
    rows = [m for m in metrics(run) if "actor/pg_loss" in m]
    assert [m["step"] for m in rows] == [1, 2, 3]
    for m in rows:
        assert m["sync/max_checksum_error"] == 0.0 and m["sync/mean_logprob_diff"] < 1e-4
        assert m["perf/tokens_per_s"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["export_max_logit_diff"] <= 1e-5
    last = checkpoint_dirs(run)[-1]
    assert last.name == "step_000003" and json.loads((last / "state.json").read_text())["world_size"] == 2
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(run / "hf")
    restored = load_checkpoint_model(last)  # the 2-rank checkpoint read by one process
    for (name, a), b in zip(hf.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_checkpoint_resumes_on_another_rank_count(tmp_path, first, second):
    """Weights and optimizer state written by `first` ranks load on `second` ranks: the resumed run's
    export (no steps left to take) equals the checkpoint exactly."""
    run = tmp_path / "run"
    common = [*SHORT, "trainer.save_every=2", "trainer.total_steps=2", f"trainer.output_dir={run}"]
    run_cli("train", *common, f"trainer.nproc={first}", "trainer.export=false", cwd=tmp_path)
    saved = load_checkpoint_model(checkpoint_dirs(run)[-1])
    proc = run_cli("train", *common, f"trainer.nproc={second}", cwd=tmp_path)
    assert "resumed from" in proc.stderr and "(step 2)" in proc.stderr
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(run / "hf")
    for (name, a), b in zip(saved.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), name


def test_two_rank_moe_with_routing_replay(tmp_path):
    """Qwen3-MoE sharded per decoder layer over 2 ranks, the rollout's routing replayed in training."""
    run = tmp_path / "run"
    run_cli("train", "gspo_qwen3_moe_arith", *SHORT, "trainer.nproc=2", "trainer.total_steps=2",
            "algo.routing_replay=true", "model.tiny.hidden_size=64", f"trainer.output_dir={run}", cwd=tmp_path)
    last = [m for m in metrics(run) if "actor/pg_loss" in m][-1]
    assert last["sync/max_checksum_error"] == 0.0 and 0.0 <= last["moe/routing_mismatch"] < 0.05
    assert last["moe/max_load_ratio"] >= 1.0 and "perf/peak_mem_update" in last
    assert json.loads((run / "summary.json").read_text())["export_max_logit_diff"] <= 1e-5
