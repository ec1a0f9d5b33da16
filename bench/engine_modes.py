"""HFEngine "generate" vs "paged" throughput on this machine; decides what mode="auto" picks.

    python bench/engine_modes.py [--reps 5] [--device cpu|cuda] [--threads N]

Workload: random-init Qwen2-shaped models built locally (seed 0, vocab 128, tied embeddings),
16 prompts of 12 tokens x n=8 samples, up to 32 new tokens, temperature 1.0. Run once with an eos id
(a random vocab id, so some samples stop early) and once with no eos (every sample runs 32 tokens).
Prints one JSON line per (model, early_stop, mode): generated tokens/s and wall seconds, medians over
--reps timed runs after one warm-up; then one line per (model, early_stop) with generate/paged ratio.
The modes alternate within each repetition so background load hits both alike. Check loadavg_1m in
the output: on a busy CPU, 2 intra-op threads make "generate" up to ~30x slower (see rollout/hf.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, run as a script
from rlcore.models import tiny_model  # noqa: E402
from rollout import HFEngine, SamplingParams  # noqa: E402

VOCAB = 128
MODELS = {  # name -> (hidden, layers, heads, kv heads, intermediate)
    "qwen2_h256_l4": (256, 4, 8, 2, 688),
    "qwen2_h128_l2": (128, 2, 8, 2, 344),
}
NUM_PROMPTS, PROMPT_LEN, SAMPLES_PER_PROMPT, MAX_NEW_TOKENS = 16, 12, 8, 32


def build_model(hidden: int, layers: int, heads: int, kv_heads: int, inter: int, device: str) -> torch.nn.Module:
    return tiny_model(VOCAB, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                      intermediate_size=inter, seed=0).to(device)


def time_once(engine: HFEngine, prompts: list[list[int]], sampling: SamplingParams, seed: int) -> tuple[float, int]:
    torch.manual_seed(seed)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    groups = engine.generate(prompts, sampling)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return wall, sum(len(s.token_ids) for group in groups for s in group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = leave torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, VOCAB, (NUM_PROMPTS, PROMPT_LEN), generator=g).tolist()
    eos_id = int(torch.randint(0, VOCAB, (1,), generator=g))
    sampling = SamplingParams(n=SAMPLES_PER_PROMPT, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0)
    modes = ("generate", "paged")

    for model_name, shape in MODELS.items():
        model = build_model(*shape, device=args.device)
        for early_stop in (True, False):
            eos = [eos_id] if early_stop else []
            engines = {m: HFEngine(model, eos_token_ids=eos, pad_token_id=0, mode=m) for m in modes}
            runs: dict[str, list[tuple[float, int]]] = {m: [] for m in modes}
            for rep in range(args.reps + 1):  # rep 0 = warm-up, not recorded
                for mode in modes:
                    result = time_once(engines[mode], prompts, sampling, seed=rep)
                    if rep > 0:
                        runs[mode].append(result)
            tokens_per_s = {}
            for mode in modes:
                walls = [w for w, _ in runs[mode]]
                rates = [t / w for w, t in runs[mode]]
                tokens_per_s[mode] = statistics.median(rates)
                print(json.dumps({
                    "model": model_name, "mode": mode, "early_stop": early_stop, "device": args.device,
                    "threads": torch.get_num_threads(), "reps": args.reps, "loadavg_1m": os.getloadavg()[0],
                    "tokens_per_s": round(tokens_per_s[mode], 1), "wall_s": round(statistics.median(walls), 3),
                    "generated_tokens": statistics.median(t for _, t in runs[mode]),
                }), flush=True)
            print(json.dumps({
                "model": model_name, "early_stop": early_stop, "device": args.device,
                "ratio_generate_over_paged": round(tokens_per_s["generate"] / tokens_per_s["paged"], 2),
            }), flush=True)


if __name__ == "__main__":
    main()
