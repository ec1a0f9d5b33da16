"""Where the rlcore RL step spends its time on the bench workload, and what candidate fast paths save.

    python bench/profile_step.py [--steps 6] [--threads N] [--only NAME ...]

Workload: bench/workload.py (the one bench/trl_side_by_side.py compares against TRL). Experiments,
each printing JSON lines:

  profile            one step after a warm-up, each Timer phase under its own torch.profiler session:
                     the top ops by self CPU time per phase (profiler overhead inflates many-small-op
                     phases such as generate; read the shares, not the absolute times).
  generate_overhead  forward hooks on the engine's model: time inside model forward calls vs the whole
                     generate call (the rest is transformers' decode loop: logits processors, sampling,
                     stopping criteria, cache bookkeeping, and rlcore's logprob recorder).
  old_logprobs       A/B on one trainer, alternating steps: the on-policy fast path (the update's own
                     log-probs, detached, as old ones; the default for this workload) vs a separate
                     old-log-prob forward. Exactness is a unit test (tests/rlcore/test_actor.py).
  attention          A/B, alternating steps: actor and engine on sdpa (the default) vs eager attention.
  packing            A/B, alternating steps: two trainers, train.packing=false (right-padded micro-batches) vs
                     the default (packed); generation is the same code in both.
  microbatch         trainers with train.max_tokens_per_microbatch 8192, 2048 (the quickstart's), 1024, interleaved:
                     padding computed vs update time.
  split_control      no trainer: forward+backward of 128 rows x 38 tokens with no padding, cut into 1, 2, 4, 8
                     micro-batches (same tokens, same math): separates the working-set effect from padding.
  entropy_graph      no trainer: forward+backward with the entropy computed in the autograd graph (as the update
                     does, also when algo.entropy_coef=0) vs not at all, on the workload model (vocab 99) and
                     on the same model with a 32768-token vocabulary; seconds and torch CPU allocator peak.
  threads            A/B, alternating steps: torch.set_num_threads(1) vs (2).
  reward_overlap     A/B, alternating steps, on the workload with the KL reference (algo.kl.coef=0.04) and
                     2 reward workers: the rewards scored in the workers while the reference forward runs
                     (the default) vs before it (collect() waiting for them). Two rewards: the sandboxed
                     `code` reward (answers as print(...) programs; CPU-bound: an interpreter per sample)
                     and bench/latency_reward.py (exact match after a 20 ms wait: a remote verifier or
                     judge). Reports the step, the reward wait and the workers' own wall time
                     (perf/reward_seconds).

A/B variants run interleaved (the order rotates every step) so load on the shared CPU hits each alike;
medians over --steps measured steps after --warmup.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402  (puts the repo root on sys.path)

import mfu  # noqa: E402
import rlcore.actor  # noqa: E402
import rlcore.trainer  # noqa: E402
from rlcore.logprobs import response_logprobs  # noqa: E402
from rlcore.metrics import Timer  # noqa: E402
from rlcore.models import char_tokenizer, tiny_model  # noqa: E402

EXPERIMENTS = ("profile", "generate_overhead", "old_logprobs", "attention", "packing", "microbatch",
               "split_control", "entropy_graph", "threads", "reward_overlap")


def emit(record: dict) -> None:
    print(json.dumps({"loadavg_1m": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads(), **record}),
          flush=True)


def timed_step(trainer) -> dict[str, float]:
    start = time.perf_counter()
    trainer.rl_step()
    seconds = time.perf_counter() - start
    trainer.step += 1
    return {"step": seconds, **{k.removeprefix("timing/"): v for k, v in trainer.timer.pop().items()}}


def run_ab(variants: dict[str, tuple], warmup: int, steps: int) -> dict[str, dict[str, float]]:
    """variants: name -> (trainer, enter(), exit()). Interleaved steps, rotating order; median seconds per phase."""
    names = list(variants)
    records: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(warmup + steps):
        for name in names[i % len(names):] + names[: i % len(names)]:
            trainer, enter, leave = variants[name]
            enter()
            try:
                r = timed_step(trainer)
            finally:
                leave()
            if i >= warmup:
                records[name].append(r)
    return {n: {k: round(statistics.median(r[k] for r in rs), 4) for k in rs[0]} for n, rs in records.items()}


def nothing() -> None:
    pass


# ------------------------------------------------------------------ experiments
class ProfiledTimer(Timer):
    """rlcore's Timer with a torch.profiler session around each phase."""

    def __init__(self, top: int):
        super().__init__()
        self.top, self.tables = top, {}

    @contextmanager
    def __call__(self, name: str):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with super().__call__(name):
                yield
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events)
        events.sort(key=lambda e: -e.self_cpu_time_total)
        self.tables[name] = {"profiled_s": round(self.seconds[name], 4), "ops_self_s": round(total / 1e6, 4),
                             "top": [[e.key, round(e.self_cpu_time_total / 1e3, 1),
                                      round(e.self_cpu_time_total / total, 3), e.count] for e in events[: self.top]]}


def exp_profile(args) -> None:
    trainer = workload.build_rlcore_trainer()
    try:
        for _ in range(args.warmup):
            timed_step(trainer)
        trainer.timer = ProfiledTimer(args.top)
        trainer.rl_step()
        for phase, table in trainer.timer.tables.items():
            emit({"experiment": "profile", "phase": phase, **table, "top_columns": ["op", "self_ms", "share", "calls"]})
    finally:
        trainer.close()


def exp_generate_overhead(args) -> None:
    trainer = workload.build_rlcore_trainer()
    model = trainer.engine.model
    acc = {"forward_s": 0.0, "calls": 0, "start": 0.0}

    def pre(*_):
        acc["start"] = time.perf_counter()

    def post(*_):
        acc["forward_s"] += time.perf_counter() - acc["start"]
        acc["calls"] += 1

    handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    try:
        for _ in range(args.warmup):
            timed_step(trainer)
        rows = []
        for _ in range(args.steps):
            acc.update(forward_s=0.0, calls=0)
            r = timed_step(trainer)
            rows.append({"generate_s": r["generate"], "forward_s": acc["forward_s"], "forward_calls": acc["calls"]})
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        outside_s = med["generate_s"] - med["forward_s"]
        emit({"experiment": "generate_overhead", **{k: round(v, 4) for k, v in med.items()},
              "forward_share": round(med["forward_s"] / med["generate_s"], 3),
              "outside_forward_ms_per_call": round(outside_s / med["forward_calls"] * 1e3, 2),
              "forward_ms_per_call": round(med["forward_s"] / med["forward_calls"] * 1e3, 2)})
    finally:
        for h in handles:
            h.remove()
        trainer.close()


def exp_old_logprobs(args) -> None:
    trainer = workload.build_rlcore_trainer()
    fast_path = trainer._exactly_on_policy

    def force_old_forward():
        trainer._exactly_on_policy = lambda num_rows: False

    def restore():
        trainer._exactly_on_policy = fast_path

    try:
        result = run_ab({"on_policy_fast_path": (trainer, nothing, nothing),
                         "old_logprob_forward": (trainer, force_old_forward, restore)}, args.warmup, args.steps)
        emit({"experiment": "old_logprobs", **result, "step_saving_frac":
              round(1 - result["on_policy_fast_path"]["step"] / result["old_logprob_forward"]["step"], 3)})
    finally:
        trainer.close()


def exp_attention(args) -> None:
    trainer = workload.build_rlcore_trainer()
    models = [trainer.actor.model, trainer.engine.model]

    def use(impl):
        return lambda: [m.set_attn_implementation(impl) for m in models] and None

    try:
        result = run_ab({"sdpa": (trainer, use("sdpa"), nothing), "eager": (trainer, use("eager"), use("sdpa"))},
                        args.warmup, args.steps)
        emit({"experiment": "attention", **result,
              "eager_over_sdpa": {k: round(result["eager"][k] / result["sdpa"][k], 3)
                                  for k in ("step", "generate", "logprobs", "update")}})
    finally:
        trainer.close()


def exp_packing(args) -> None:
    trainers = {"padded": workload.build_rlcore_trainer(["train.packing=false"]),
                "packed": workload.build_rlcore_trainer()}
    try:
        result = run_ab({k: (t, nothing, nothing) for k, t in trainers.items()}, args.warmup, args.steps)
        emit({"experiment": "packing", **result,
              "packed_over_padded": {k: round(result["packed"][k] / result["padded"][k], 3)
                                     for k in ("step", "generate", "update") if result["padded"][k]}})
    finally:
        for t in trainers.values():
            t.close()


def exp_microbatch(args) -> None:
    budgets = (8192, 2048, 1024)
    trainers = {b: workload.build_rlcore_trainer([f"train.max_tokens_per_microbatch={b}"]) for b in budgets}
    grids = {b: [] for b in budgets}
    real_split = rlcore.actor.micro_batches
    current = {}

    def split_and_count(lengths, max_tokens, *, packed):
        parts = real_split(lengths, max_tokens, packed=packed)
        if torch.is_grad_enabled():  # the update's split
            # packed: the real tokens; padded: rows x longest, per micro-batch
            grid = sum(sum(lengths[j] for j in i) if packed else len(i) * max(lengths[j] for j in i) for i in parts)
            grids[current["b"]].append((grid, sum(lengths), len(parts)))
        return parts

    rlcore.actor.micro_batches = split_and_count
    try:
        variants = {str(b): (trainers[b], (lambda b=b: current.update(b=b)), nothing) for b in budgets}
        result = run_ab(variants, args.warmup, args.steps)
        for b in budgets:
            grid, real, parts = (statistics.median(g[i] for g in grids[b][args.warmup:]) for i in range(3))
            result[str(b)] |= {"microbatches": parts, "padding_waste": round(1 - real / grid, 3)}
        emit({"experiment": "microbatch", "max_tokens_per_microbatch": result})
    finally:
        rlcore.actor.micro_batches = real_split
        for t in trainers.values():
            t.close()


def _scoring_batch(vocab: int, rows: int = 128):
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, vocab, (rows, mfu.PROMPT_TOKENS), generator=g).tolist()
    responses = torch.randint(2, vocab, (rows, workload.MAX_NEW_TOKENS), generator=g)
    return prompts, responses, torch.ones(rows, workload.MAX_NEW_TOKENS)


def _fwd_bwd(model, prompts, responses, mask, *, chunks: int = 1, with_entropy: bool = True) -> None:
    n = len(prompts) // chunks
    for c in range(chunks):
        rows = slice(c * n, (c + 1) * n)
        logp, _ = response_logprobs(model, prompts[rows], responses[rows], mask[rows], temperature=1.0, pad_id=0,
                                    with_entropy=with_entropy)
        (-logp.sum() / mask.sum()).backward()
    model.zero_grad(set_to_none=True)


def _median_interleaved(fns: dict, reps: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: round(statistics.median(v), 4) for k, v in times.items()}


def exp_split_control(args) -> None:
    model = workload.build_model(char_tokenizer()).train()
    batch = _scoring_batch(len(char_tokenizer()))
    fns = {str(c): (lambda c=c: _fwd_bwd(model, *batch, chunks=c)) for c in (1, 2, 4, 8)}
    emit({"experiment": "split_control", "tokens": 128 * (mfu.PROMPT_TOKENS + workload.MAX_NEW_TOKENS),
          "seconds_by_microbatches": _median_interleaved(fns, args.steps)})


def exp_entropy_graph(args) -> None:
    for vocab in (len(char_tokenizer()), 32768):
        m = workload.MODEL
        model = tiny_model(vocab, hidden_size=m["hidden_size"], num_layers=m["num_layers"], num_heads=m["num_heads"],
                           num_kv_heads=m["num_kv_heads"], intermediate_size=m["intermediate_size"], seed=0).train()
        batch = _scoring_batch(vocab)
        fns = {"entropy_in_graph": lambda: _fwd_bwd(model, *batch, with_entropy=True),
               "no_entropy": lambda: _fwd_bwd(model, *batch, with_entropy=False)}
        seconds = _median_interleaved(fns, max(2, args.steps // 2))
        peaks = {}
        for k, fn in fns.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
            peaks[k] = round(mfu._alloc_peak_bytes(prof) / mfu.MB, 1)
        emit({"experiment": "entropy_graph", "vocab": vocab, "seconds": seconds, "alloc_peak_mb": peaks})


def exp_threads(args) -> None:
    trainer = workload.build_rlcore_trainer()
    default = torch.get_num_threads()
    try:
        result = run_ab({"1": (trainer, lambda: torch.set_num_threads(1), lambda: torch.set_num_threads(default)),
                         "2": (trainer, lambda: torch.set_num_threads(2), lambda: torch.set_num_threads(default))},
                        args.warmup, args.steps)
        emit({"experiment": "threads", **result})
    finally:
        trainer.close()


def exp_reward_overlap(args) -> None:
    latency = os.path.join(os.path.dirname(os.path.abspath(__file__)), "latency_reward.py")
    for name, overrides in {
        "code": ["data.task.answer_format=program", "reward.terms=[{name: code, weight: 1.0, args: {timeout_s: 2.0}}]"],
        "latency_20ms": [f"reward.terms=[{{name: 'python:{latency}:exact_after_wait', weight: 1.0}}]"],
    }.items():
        trainer = workload.build_rlcore_trainer([*overrides, "reward.num_workers=2", "algo.kl.coef=0.04"])
        reward_overlap_ab(trainer, name, args)


def reward_overlap_ab(trainer, reward: str, args) -> None:
    reward_seconds = {"overlapped": [], "serial": []}
    step = trainer.rl_step

    def use(name: str, overlap: bool):
        def enter():
            trainer.overlap_rewards = overlap  # as reward.overlap=true / false

            def recorded():
                metrics = step()
                reward_seconds[name].append(metrics["perf/reward_seconds"])
                return metrics
            trainer.rl_step = recorded
        return enter

    try:
        result = run_ab({"overlapped": (trainer, use("overlapped", True), nothing),
                         "serial": (trainer, use("serial", False), nothing)}, args.warmup, args.steps)
        for name, values in reward_seconds.items():
            result[name]["reward_workers"] = round(statistics.median(values[args.warmup:]), 4)
        emit({"experiment": "reward_overlap", "reward": reward, **result,
              "step_saving_frac": round(1 - result["overlapped"]["step"] / result["serial"]["step"], 3)})
    finally:
        trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per variant")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch default")
    parser.add_argument("--top", type=int, default=8, help="ops listed per phase in the profile")
    parser.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.only:
        globals()[f"exp_{name}"](args)


if __name__ == "__main__":
    main()
