"""The vllm engine against the hf engine: generated tokens/s and whole RL step time, same run.

    python bench/vllm_vs_hf.py [--shape quickstart|9m|25m|100m ...] [--steps 6] [--threads N]

Needs vLLM (on CPU: the environment `bash .ci/vllm` builds, `.venv-vllm`). For each shape two real
`Trainer`s are built from the same recipe and seed, one per engine, and their RL steps alternate (one
warm-up step each, then --steps timed each), so load on the machine hits both alike. Both draw the same
prompts (same sampler seed); the samples differ (each engine its own RNG use). Prints one JSON line per
(shape, engine) with medians of timing/generate, timing/step and perf/tokens_per_s, then one line per
shape with the vllm / hf ratios.

Shapes (random-init Qwen2 over the character tokenizer, fp32, GRPO, exact-match reward):
    quickstart  the quickstart's model and batch (hidden 128, 2 layers; 64 prompts x 16 samples, 8 new tokens)
    9m          hidden 384, 6 layers, 6 heads (2 KV), intermediate 1024: 9.4M parameters; as 25m
    25m         hidden 512, 8 layers, 8 heads (4 KV), intermediate 1408: 23.6M parameters;
                16 prompts x 8 samples, 64 new tokens
    100m        hidden 768, 12 layers, 12 heads (4 KV), intermediate 3072: 104M parameters; as 25m
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, run as a script

import torch  # noqa: E402

from workload import scratch_dir  # noqa: E402

COMMON = ["model.warmstart.steps=0", "trainer.eval_every=0", "trainer.save_every=0", "trainer.sample_text_every=0",
          "trainer.export=false", "trainer.device=cpu", "algo.kl.coef=0", "rollout.verify_sync=true"]
SHAPES = {
    "quickstart": [],  # the recipe as it is
    "9m": ["model.tiny.hidden_size=384", "model.tiny.num_layers=6", "model.tiny.num_heads=6",
           "model.tiny.num_kv_heads=2", "model.tiny.intermediate_size=1024", "train.prompts_per_step=16",
           "rollout.samples_per_prompt=8", "rollout.max_new_tokens=64", "train.max_tokens_per_microbatch=4096"],
    "25m": ["model.tiny.hidden_size=512", "model.tiny.num_layers=8", "model.tiny.num_heads=8",
            "model.tiny.num_kv_heads=4", "model.tiny.intermediate_size=1408", "train.prompts_per_step=16",
            "rollout.samples_per_prompt=8", "rollout.max_new_tokens=64", "train.max_tokens_per_microbatch=4096"],
    "100m": ["model.tiny.hidden_size=768", "model.tiny.num_layers=12", "model.tiny.num_heads=12",
             "model.tiny.num_kv_heads=4", "model.tiny.intermediate_size=3072", "train.prompts_per_step=16",
             "rollout.samples_per_prompt=8", "rollout.max_new_tokens=64", "train.max_tokens_per_microbatch=4096"],
}
KEYS = ("timing/generate", "timing/sync", "timing/update", "timing/step", "perf/tokens_per_s")


def build(engine: str, shape: str):
    from rlcore.config import freeze
    from rlcore.recipe import compose
    from rlcore.trainer import Trainer
    from rlcore.validate import validate

    cfg, _ = compose("quickstart", [*COMMON, *SHAPES[shape], f"rollout.engine={engine}"])
    plan = validate(cfg)
    freeze(cfg)
    return Trainer(cfg, plan, scratch_dir(f"rlcore-bench-{engine}-"))


def step(trainer) -> dict[str, float]:
    import time

    start = time.perf_counter()
    metrics = trainer.rl_step()
    metrics |= trainer.timer.pop() | {"timing/step": time.perf_counter() - start}
    metrics["perf/tokens_per_s"] = metrics["perf/generated_tokens"] / metrics["timing/generate"]
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for shape in args.shape:
        trainers = {"vllm": build("vllm", shape), "hf": build("hf", shape)}  # vLLM first: it sizes its memory
        params = sum(p.numel() for p in trainers["hf"].actor.model.parameters())
        records = {name: [] for name in trainers}
        try:
            for i in range(args.steps + 1):
                for name, trainer in trainers.items():
                    metrics = step(trainer)
                    if i:  # the first step of each warms up
                        records[name].append(metrics)
        finally:
            for trainer in trainers.values():
                trainer.close()
        medians = {}
        for name, rows in records.items():
            medians[name] = {k: statistics.median(r[k] for r in rows) for k in KEYS}
            tokens = statistics.median(r["perf/generated_tokens"] for r in rows)
            print(json.dumps({"shape": shape, "engine": name, "params": params, "steps": args.steps,
                              "threads": args.threads, "tokens_per_step": tokens,
                              "loadavg_1m": os.getloadavg()[0], **{k: round(v, 4) for k, v in medians[name].items()}}))
        v, h = medians["vllm"], medians["hf"]
        print(json.dumps({"shape": shape, "vllm/hf tokens_per_s": round(v["perf/tokens_per_s"] / h["perf/tokens_per_s"], 3),
                          "vllm/hf generate_s": round(v["timing/generate"] / h["timing/generate"], 3),
                          "vllm/hf step_s": round(v["timing/step"] / h["timing/step"], 3)}), flush=True)


if __name__ == "__main__":
    main()
