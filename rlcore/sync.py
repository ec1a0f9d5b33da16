"""Weight sync into the rollout engine, and the check that the engine samples from those weights.

Silent stale weights are the top failure in peer frameworks: if the engine keeps sampling from old
weights, the importance ratios are quietly wrong and training drifts. The check is free here: the
engine returns the log-probs of what it sampled, and the step recomputes them with the actor, so the
two must agree (within numerical noise) whenever sampling is not truncated by top-k / top-p.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from rlcore.lora import is_lora, merged_state
from rlcore.sharding import full_tensor
from rollout.base import checksum
from rollout.weight_names import checkpoint_tensors

# Mean |engine - actor| log-prob allowed per dtype: fp32 kernels agree to ~1e-6, bf16 to ~1e-2.
MEAN_ABS_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def stream_weights(model, bucket_mb: int, stats: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) in checkpoint format (rollout.weight_names: per-expert MoE tensors, the
    names from_pretrained and vLLM load), gathered one bucket of at most bucket_mb at a time. A LoRA
    actor sends its merged weights (rlcore.lora.merged_state), computed tensor by tensor.

    A sharded (FSDP) actor all-gathers each bucket's tensors here, on every rank in the same order;
    the bucket is dropped before the next is gathered, so beyond the sharded model at most one bucket
    of full tensors (or one tensor, if larger) is alive: stats["max_bucket_bytes"] records it. With
    one process the "full tensors" are the actor's own parameters (no copy). A parameter shared
    under two names (tied embeddings) is sent once; the engines tie it themselves.
    """
    bucket_bytes, model_type = bucket_mb * 2**20, model.config.model_type
    bucket, size, first_name = [], 0, {}
    named = merged_state(model) if is_lora(model) else model.state_dict(keep_vars=True).items()
    for name, param in named:
        if id(param) in first_name:  # checked under both names: an engine may compute with two copies
            stats["aliases"][name] = first_name[id(param)]
            continue
        first_name[id(param)] = name
        nbytes = param.numel() * param.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield from _send(bucket, size, model_type, stats)
            bucket, size = [], 0
        bucket.append((name, param))
        size += nbytes
    if bucket:
        yield from _send(bucket, size, model_type, stats)


def _send(bucket: list, size: int, model_type: str, stats: dict) -> Iterator[tuple[str, torch.Tensor]]:
    full = [(name, full_tensor(p.detach())) for name, p in bucket]  # the collective: the whole bucket at once
    stats["bytes"] += size
    stats["buckets"] += 1
    stats["max_bucket_bytes"] = max(stats.get("max_bucket_bytes", 0), size)
    for name, tensor in full:
        for ckpt_name, view in checkpoint_tensors(name, tensor, model_type):
            stats["checksums"][ckpt_name] = checksum(view)
            yield ckpt_name, view


def sync_weights(model, engine, *, bucket_mb: int, verify: bool = True, dtype: torch.dtype | None = None
                 ) -> dict[str, float]:
    """Stream the actor's weights into the engine; then (verify) compare checksums of every tensor in
    the engine with those sent, and stop naming the worst tensor if one differs beyond the engine
    dtype's rounding."""
    start = time.perf_counter()
    stats = {"bytes": 0, "buckets": 0, "checksums": {}, "aliases": {}}
    engine.load_weights(stream_weights(model, bucket_mb, stats))
    metrics = {"sync/bytes": float(stats["bytes"]), "sync/buckets": float(stats["buckets"]),
               "sync/max_bucket_bytes": float(stats.get("max_bucket_bytes", 0)),
               "sync/seconds": time.perf_counter() - start}
    if verify and hasattr(engine, "weight_checksums"):
        sent = stats["checksums"]
        # A tied head is sent once but may be computed from its own packed copy (vLLM on CPU): ask
        # for it by its own name too. _send rewrites checkpoint names, aliases are state_dict names.
        sent |= {alias: sent[first] for alias, first in stats["aliases"].items() if first in sent}
        got = engine.weight_checksums(list(sent))
        # Casting to the engine's dtype rounds each element by up to half a unit in the last place:
        # the sum moves by at most that fraction of sum |x|.
        tol = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 1e-3}.get(dtype or torch.float32, 4e-3)
        # An engine may leave out tensors it cannot map one to one (vLLM's re-laid-out experts): those
        # are covered by the log-prob check only.
        errors = {n: max(abs(got[n][0] - s[0]), abs(got[n][1] - s[1])) / max(s[1], 1e-12)
                  for n, s in sent.items() if n in got}
        metrics["sync/checksummed_tensors"] = float(len(errors))
        worst = max(errors, key=errors.get) if errors else None
        metrics["sync/max_checksum_error"] = errors[worst] if worst else 0.0
        if worst is not None and errors[worst] > tol:
            raise RuntimeError(
                f"weight sync check failed: tensor {worst!r} in the rollout engine differs from the actor's "
                f"(relative checksum error {errors[worst]:.3g} > {tol:g}); the engine is not sampling from the "
                "weights being trained. Set rollout.verify_sync=false only to debug.")
    metrics["sync/seconds"] = time.perf_counter() - start
    return metrics


def verify_rollout_logprobs(batch, old_logprobs: torch.Tensor, cfg, tokenizer) -> dict[str, float]:
    """Compare engine log-probs with the actor's; stop the run on a mismatch (rollout.verify_sync)."""
    mask = batch.mask
    diff = (batch.rollout_logprobs - old_logprobs).abs() * mask
    num_tokens = mask.sum().clamp(min=1)
    mean_diff = (diff.sum() / num_tokens).item()
    metrics = {"sync/max_logprob_diff": diff.max().item(), "sync/mean_logprob_diff": mean_diff}
    r = cfg.rollout
    truncated = r.top_p < 1.0 or r.top_k > 0  # the engine's distribution is then renormalised
    tolerance = max(MEAN_ABS_TOLERANCE.get(d, 5e-2) for d in _dtypes(cfg))
    if r.verify_sync and not truncated and mean_diff > tolerance:
        worst = int((diff.sum(-1) / mask.sum(-1).clamp(min=1)).argmax())
        prompt = tokenizer.decode(batch.prompt_ids[worst])
        raise RuntimeError(
            f"weight sync check failed: the rollout engine's log-probs differ from the actor's by {mean_diff:.3g} "
            f"on average (tolerance {tolerance:g}); worst prompt: {prompt!r}. The engine is not sampling from "
            "the weights being trained. Set rollout.verify_sync=false only to debug."
        )
    return metrics


def _dtypes(cfg) -> list[torch.dtype]:
    """The actor's and the engine's weight dtypes."""
    from rlcore.models import DTYPES

    return [DTYPES[cfg.model.dtype], DTYPES[cfg.rollout.dtype or cfg.model.dtype]]
