"""The GPU goals of the benchmarks issue on a random-init Qwen2.5-1.5B-shaped model (no weights needed).

    python bench/gpu_step.py [--only peak train decode sync step] [--engine hf|vllm] [--shape 1.5b|tiny]

CUDA and bf16 by default; `--device cpu --shape tiny` runs the same code small in fp32 (the smoke test,
tests/bench). One JSON line per experiment:

  peak    the device's measured limits: dtype torch.mm FLOP/s (best over --mm-sizes) and memory bandwidth
          (a large device-to-device copy: read + write bytes / s).
  train   forward+backward through rlcore's scoring path (rlcore.logprobs.response_logprobs, entropy on,
          as in the update) of --train-rows x --train-len tokens, weights in the dtype: MFU against the
          measured peak (model FLOPs as in bench/mfu.py: 6 N + 6 l d L per token). Goal: >= 40 %.
  decode  the rollout engine's generate, --prompts x --samples rows, --new-tokens each (a random model
          rarely stops early: the count is of real generated tokens): tokens/s against the bandwidth
          roofline, where a decode step must at least read the weights once and each row's KV cache so
          far (rows x context x layers x 2 x kv_heads x head_dim x dtype bytes). Goal: >= 50 %.
  sync    rlcore.sync.sync_weights from the actor into the engine (bucketed, checksums verified):
          seconds, bytes, GB/s.
  step    the real Trainer (quickstart recipe, this model shape, --engine, GRPO without KL): median
          seconds per phase over --steps after one warm-up, and (sync + wake + sleep) / step. Goal: <= 5 %.
          The character tokenizer gives a 99-token vocabulary here (the others use 151,936).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402  (puts the repo root on sys.path)

import mfu  # noqa: E402
from rlcore.logprobs import response_logprobs  # noqa: E402
from rlcore.models import tiny_model  # noqa: E402
from rlcore.sync import sync_weights  # noqa: E402
from rollout import SamplingParams, get_engine  # noqa: E402

SHAPES = {  # Qwen2.5-1.5B (config.json of the release): tied embeddings, q/k/v bias
    "1.5b": dict(vocab=151936, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960),
    "tiny": dict(vocab=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=344),
}
EXPERIMENTS = ("peak", "train", "decode", "sync", "step")


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def synced(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    synced(device)
    start = time.perf_counter()
    fn()
    synced(device)
    return time.perf_counter() - start


def build(shape: dict, dtype: torch.dtype, device: str):
    s = {k: v for k, v in shape.items() if k != "vocab"}
    return tiny_model(shape["vocab"], family="qwen2", seed=0, max_positions=4096, **s).to(device=device, dtype=dtype)


def measure_peak(args, dtype, device) -> dict:
    flops = {}
    for n in args.mm_sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        flops[n] = 2 * n**3 / min(timed(lambda: torch.mm(a, b), device) for _ in range(args.reps))
    x = torch.empty(args.copy_mb * 2**20 // 4, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    y.copy_(x)
    bandwidth = 2 * x.numel() * 4 / min(timed(lambda: y.copy_(x), device) for _ in range(args.reps))
    return {"experiment": "peak", "dtype": str(dtype), "peak_flops": max(flops.values()),
            "per_size_tflops": {n: round(f / 1e12, 2) for n, f in flops.items()},
            "bandwidth_gbs": round(bandwidth / 1e9, 1)}


def measure_train(args, shape, dtype, device, peak_flops) -> dict:
    model = build(shape, dtype, device).train()
    g = torch.Generator().manual_seed(0)
    prompt_len = args.train_len // 4
    response_len = args.train_len - prompt_len
    prompts = torch.randint(2, shape["vocab"], (args.train_rows, prompt_len), generator=g).tolist()
    responses = torch.randint(2, shape["vocab"], (args.train_rows, response_len), generator=g).to(device)
    mask = torch.ones(args.train_rows, response_len, device=device)

    def step():
        logp, _ = response_logprobs(model, prompts, responses, mask, temperature=1.0, pad_id=0, with_entropy=True)
        (-(logp * mask).sum() / mask.sum()).backward()
        model.zero_grad(set_to_none=True)

    step()
    seconds = statistics.median(timed(step, device) for _ in range(args.reps))
    tokens = args.train_rows * args.train_len
    flops = tokens * mfu.flops_per_token(mfu.model_shape(model), args.train_len, backward=True)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"experiment": "train", "batch": [args.train_rows, args.train_len], "seconds": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 1), "achieved_tflops": round(flops / seconds / 1e12, 3),
            "mfu": round(flops / seconds / peak_flops, 4), "peak_mem_gib": memory, **mfu.model_shape(model)}


def make_engine(name: str, model, args):
    kwargs = {"gpu_memory_utilization": args.gpu_memory_utilization} if name == "vllm" else {}
    return get_engine(name)(model, eos_token_ids=[1], pad_token_id=0, **kwargs)


def measure_decode(args, shape, dtype, device, bandwidth) -> dict:
    model = build(shape, dtype, device)
    engine = make_engine(args.engine, model, args)
    if args.engine == "vllm":
        sync_weights(model, engine, bucket_mb=512, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, shape["vocab"], (args.prompts, args.prompt_len), generator=g).tolist()
    sampling = SamplingParams(n=args.samples, max_new_tokens=args.new_tokens, temperature=1.0)
    engine.generate(prompts[:2], SamplingParams(n=2, max_new_tokens=8))  # warm-up
    synced(device)
    start = time.perf_counter()
    out = engine.generate(prompts, sampling)
    synced(device)
    seconds = time.perf_counter() - start
    lengths = [len(s.token_ids) for group in out for s in group]
    # Roofline: each decode step reads the weights once and every live row's KV cache so far.
    s, bytes_per = mfu.model_shape(model), torch.finfo(dtype).bits // 8
    head_dim = shape["hidden_size"] // shape["num_heads"]
    kv_per_token = s["layers"] * 2 * shape["num_kv_heads"] * head_dim * bytes_per
    weight_bytes = sum(p.numel() for p in model.parameters()) * bytes_per
    floor_s = decode_floor_seconds(lengths, args.prompt_len, weight_bytes, kv_per_token, bandwidth)
    generated = sum(lengths)
    return {"experiment": "decode", "engine": args.engine, "rows": len(lengths), "new_tokens_max": max(lengths),
            "generated": generated, "seconds": round(seconds, 3), "tokens_per_s": round(generated / seconds, 1),
            "roofline_tokens_per_s": round(generated / floor_s, 1), "of_roofline": round(floor_s / seconds, 4)}


def decode_floor_seconds(lengths: list[int], prompt_len: int, weight_bytes: int, kv_per_token: int,
                         bandwidth: float) -> float:
    """Least time to decode rows of these lengths: step t reads the weights once and the KV cache of
    the rows still generating, prompt_len + t tokens each."""
    seconds = 0.0
    for t in range(max(lengths)):
        live = sum(n > t for n in lengths)
        seconds += (weight_bytes + live * (prompt_len + t) * kv_per_token) / bandwidth
    return seconds


def measure_sync(args, shape, dtype, device) -> dict:
    actor = build(shape, torch.float32 if device == "cpu" else dtype, device)
    engine = make_engine(args.engine, build(shape, dtype, device) if args.engine == "hf" else actor, args)
    metrics = [sync_weights(actor, engine, bucket_mb=args.bucket_mb, dtype=dtype) for _ in range(args.reps)]
    seconds = statistics.median(m["sync/seconds"] for m in metrics)
    return {"experiment": "sync", "engine": args.engine, "bytes": metrics[0]["sync/bytes"],
            "seconds": round(seconds, 4),
            "gb_per_s": round(metrics[0]["sync/bytes"] / seconds / 1e9, 2),
            "max_checksum_error": max(m.get("sync/max_checksum_error", 0.0) for m in metrics)}


def measure_step(args, shape, dtype, device) -> dict:
    overrides = [f"model.tiny.{k}={v}" for k, v in shape.items() if k != "vocab"]
    overrides += [f"trainer.device={device}", f"rollout.engine={args.engine}", f"model.dtype={dtype_name(dtype)}",
                  f"train.prompts_per_step={args.prompts}", f"rollout.samples_per_prompt={args.samples}",
                  f"rollout.max_new_tokens={args.new_tokens}"]
    if device == "cuda":
        overrides += ["train.max_tokens_per_microbatch=16384"]
    trainer = workload.build_rlcore_trainer(overrides)
    try:
        records = []
        for i in range(args.steps + 1):
            start = time.perf_counter()
            metrics = trainer.rl_step()
            trainer.step += 1
            record = {"step": time.perf_counter() - start, **trainer.timer.pop(),
                      "generated": metrics["perf/generated_tokens"]}
            records += [record] if i else []
    finally:
        trainer.close()
    for r in records:  # engine.sleep() and the step's bookkeeping run outside the Timer's phases
        r["untimed"] = r["step"] - sum(v for k, v in r.items() if k.startswith("timing/"))
    median = {k: round(statistics.median(r[k] for r in records), 4) for k in records[0]}
    switch = median.get("timing/sync", 0.0) + max(0.0, median["untimed"])
    return {"experiment": "step", "engine": args.engine, "steps": args.steps, **median,
            "sync_and_switch_share": round(switch / median["step"], 4)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=SHAPES, default="1.5b")
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--mm-sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--copy-mb", type=int, default=1024, help="bytes copied for the bandwidth")
    parser.add_argument("--train-rows", type=int, default=16)
    parser.add_argument("--train-len", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="measured RL steps (after one warm-up)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    shape = SHAPES[args.shape]
    torch.manual_seed(0)
    peak = measure_peak(args, dtype, args.device)
    if "peak" in args.only:
        emit(peak)
    if "train" in args.only:
        emit(measure_train(args, shape, dtype, args.device, peak["peak_flops"]))
    if "decode" in args.only:
        emit(measure_decode(args, shape, dtype, args.device, peak["bandwidth_gbs"] * 1e9))
    if "sync" in args.only:
        emit(measure_sync(args, shape, dtype, args.device))
    if "step" in args.only:
        emit(measure_step(args, shape, dtype, args.device))


if __name__ == "__main__":
    main()
