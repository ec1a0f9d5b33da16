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

from rollout.weight_names import checkpoint_state

# Mean |engine - actor| log-prob allowed per dtype: fp32 kernels agree to ~1e-6, bf16 to ~1e-2.
MEAN_ABS_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def stream_weights(model, bucket_mb: int, stats: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) in checkpoint format (rollout.weight_names: per-expert MoE tensors, the
    names from_pretrained and vLLM load), one bucket of about bucket_mb at a time.

    With one process the tensors are views of the actor's own (no copy); a sharded actor gathers each
    bucket here before yielding it, so the whole model is never materialised twice.
    """
    bucket_bytes, in_bucket = bucket_mb * 2**20, 0
    for name, tensor in checkpoint_state(model):
        in_bucket += tensor.numel() * tensor.element_size()
        stats["bytes"] += tensor.numel() * tensor.element_size()
        if in_bucket >= bucket_bytes:
            stats["buckets"] += 1
            in_bucket = 0
        yield name, tensor
    stats["buckets"] += in_bucket > 0


def sync_weights(model, engine, *, bucket_mb: int) -> dict[str, float]:
    start = time.perf_counter()
    stats = {"bytes": 0, "buckets": 0}
    engine.load_weights(stream_weights(model, bucket_mb, stats))
    return {"sync/bytes": float(stats["bytes"]), "sync/buckets": float(stats["buckets"]),
            "sync/seconds": time.perf_counter() - start}


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
