"""The memory plan (rlcore.plan) against measured live-tensor peaks of a real RL step, per phase.

    python bench/plan_vs_measured.py [--prompts 4] [--samples 4] [--new-tokens 64] [--threads 1] [key=value ...]

Model: rlcore.models.tiny_model, Qwen2 shape, hidden 768, 12 layers, 12 heads, 4 KV heads, intermediate
2048, vocabulary 32000, tied embeddings: 100.1M parameters in fp32, saved to a temporary folder with the
character tokenizer (model.path). Sampling from 32000 tokens almost never draws EOS, so every response is
rollout.max_new_tokens long: the plan's worst case is the real case. Prompts are 2-digit additions, at most
6 tokens (data.max_prompt_tokens=6).

Trainer: the quickstart recipe with overrides (warm start, eval, saving and export off; algo.kl.coef=0.04
so a reference model exists and the logprobs phase runs its forward), on CPU. One warm-up step first, so
gradients and AdamW moments exist as in every later step; then one measured step.

Measured per Timer phase ("generate" is the plan's "rollout"): the peak of live tensor bytes (not RSS) =
live tensor bytes when profiling starts (gc scan, storages once: bench/mfu.live_tensor_bytes) + the running
sum of the torch CPU allocator's allocations and frees from torch.profiler's memory events, as
bench/mfu.py reads them, but over ONE session spanning the warm-up and the measured step, with each phase
marked by a record_function: the allocator reports a free only for a block it saw allocated while profiling,
so per-phase sessions (mfu.MemoryTimer) miss frees of older tensors, e.g. the gradients that
zero_grad(set_to_none=True) drops at the start of the update, and overstate that phase by their size.
drift_mb (running sum minus a fresh scan at the end) checks the accounting.

Printed per phase, one JSON line: estimate, measured, their ratio, and the same for the part above the
resident parameters, AdamW moments, reference and engine weights (exact byte counts, matched by the live
bytes at phase starts), which is what the activation, KV-cache, logits and sync formulas have to get right.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mfu  # noqa: E402
import workload  # noqa: E402  (puts the repo root on sys.path)

from rlcore.metrics import Timer  # noqa: E402

MODEL = {"vocab": 32000, "hidden_size": 768, "num_layers": 12, "num_heads": 12, "num_kv_heads": 4,
         "intermediate_size": 2048}
RESIDENT = ("actor params", "actor grads", "actor AdamW (2 moments)", "reference params", "engine weights",
            "critic params+grads+AdamW")
PHASES = {"sync": "sync", "generate": "rollout", "logprobs": "logprobs", "update": "update", "critic": "critic"}
MiB = 2**20


class PhaseMarks(Timer):
    """rlcore's Timer that also marks each phase in the profiler trace."""

    @contextmanager
    def __call__(self, name: str):
        with torch.profiler.record_function(f"phase::{name}"), super().__call__(name):
            yield


def phase_peaks(prof, baseline: int) -> tuple[dict[str, dict[str, int]], int]:
    """Per phase (its last occurrence): live tensor bytes at its start and their peak inside it, from the
    running sum of the CPU allocator's events on top of `baseline`; and the final level."""
    events = mfu.trace_events(prof)
    windows = {}
    for e in sorted((e for e in events if e.get("ph") == "X" and str(e.get("name")).startswith("phase::")),
                    key=lambda e: e["ts"]):
        windows[e["name"].removeprefix("phase::")] = (e["ts"], e["ts"] + e["dur"])
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0),
                    key=lambda e: e["ts"])
    out = {name: {"live_start": None, "peak": 0} for name in windows}
    level = baseline
    for e in memory:
        for name, (start, end) in windows.items():
            if out[name]["live_start"] is None and e["ts"] >= start:
                out[name]["live_start"] = level
            if start <= e["ts"] <= end:
                out[name]["peak"] = max(out[name]["peak"], level + e["args"]["Bytes"])
        level += e["args"]["Bytes"]
    return out, level


def save_model(folder: str, model: dict = MODEL) -> str:
    from rlcore.models import char_tokenizer, tiny_model

    tok = char_tokenizer()
    m = tiny_model(model["vocab"], hidden_size=model["hidden_size"], num_layers=model["num_layers"],
                   num_heads=model["num_heads"], num_kv_heads=model["num_kv_heads"],
                   intermediate_size=model["intermediate_size"], pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id)
    m.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def overrides(model_path: str, *, prompts: int, samples: int, new_tokens: int, extra=()) -> list[str]:
    return [f"model.path={model_path}", "model.warmstart.steps=0", "data.max_prompt_tokens=6",
            f"train.prompts_per_step={prompts}", f"rollout.samples_per_prompt={samples}",
            f"rollout.max_new_tokens={new_tokens}", "rollout.mode=generate", "algo.kl.coef=0.04",
            "train.max_tokens_per_microbatch=2048", "trainer.eval_every=0", "trainer.save_every=0",
            "trainer.sample_text_every=0", "trainer.export=false", "trainer.device=cpu", "reward.num_workers=1",
            *extra]


def measure(cfg_overrides: list[str], warmup: int = 1):
    """(cfg, {timer phase: {"live_start", "peak"}} of the last step, batch facts) after `warmup` steps.

    One profiler session over all steps: the allocator reports a free only for a block it saw allocated
    while profiling, so the gradients and AdamW moments of the warm-up step must be allocated under it too.
    Only the tensors that exist before it (weights, engine, reference) are outside, and they stay."""
    from rlcore.config import freeze
    from rlcore.recipe import compose
    from rlcore.trainer import Trainer
    from rlcore.validate import validate

    cfg, _ = compose("quickstart", cfg_overrides)
    plan = validate(cfg)
    freeze(cfg)
    trainer = Trainer(cfg, plan, workload.scratch_dir("rlcore-plan-"))
    try:
        trainer.timer = PhaseMarks()
        gc.collect()
        baseline = mfu.live_tensor_bytes()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(warmup + 1):
                trainer.rl_step()
                trainer.step += 1
        gc.collect()
        memory, level = phase_peaks(prof, baseline)
        lengths = trainer._last.batch.mask.sum(-1)
        facts = {"rows": len(lengths), "response_min": int(lengths.min()),
                 "prompt_max": max(len(p) for p in trainer._last.batch.prompt_ids),
                 # the running sum against a fresh scan at the end: how much the accounting drifted
                 "drift_mb": round((level - mfu.live_tensor_bytes()) / MiB, 1)}
        return cfg, memory, facts
    finally:
        trainer.close()


def compare(plan, memory: dict) -> list[dict]:
    rows = []
    for timer_name, phase in PHASES.items():
        if timer_name not in memory or phase not in plan.phases:
            continue
        parts, got = plan.phases[phase], memory[timer_name]
        est, resident = plan.total(phase), sum(v for k, v in parts.items() if k in RESIDENT)
        rows.append({"phase": phase, "estimate_mb": round(est / MiB, 1), "measured_mb": round(got["peak"] / MiB, 1),
                     "ratio": round(est / got["peak"], 3), "live_start_mb": round(got["live_start"] / MiB, 1),
                     # the part above the resident weights and state (their bytes are exact: see live_start_mb)
                     "above_resident_estimate_mb": round((est - resident) / MiB, 1),
                     "above_resident_measured_mb": round((got["peak"] - resident) / MiB, 1),
                     "above_resident_ratio": round((est - resident) / max(got["peak"] - resident, 1), 3),
                     "components_mb": {k: round(v / MiB, 1) for k, v in parts.items() if v}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steady on a shared machine; the peaks do not depend on it); 0 = default")
    parser.add_argument("extra", nargs="*", help="more key=value overrides")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from rlcore.plan import estimate

    start = time.perf_counter()
    path = save_model(str(workload.scratch_dir("rlcore-plan-model-")))
    cfg, memory, batch = measure(overrides(path, prompts=args.prompts, samples=args.samples,
                                           new_tokens=args.new_tokens, extra=args.extra))
    plan = estimate(cfg)
    for row in compare(plan, memory):
        print(json.dumps({**row, "params_m": round(plan.shape.params / 1e6, 2), **batch,
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
