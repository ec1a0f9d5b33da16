"""Mixture-of-experts in the training forward: routing replay, expert-load metrics, the router aux loss.

Routing replay (R3, spec §5.3): the experts each token was routed to during rollout are forced in the
training forward passes (old log-probs and update), while the top-k weights are recomputed from the
training router's logits over those experts, so the router still gets gradients. Without replay the
trainer's router may pick other experts than the engine's for the same token, and the ratio
pi_theta / pi_old then mixes a policy change with a routing change.

The router auxiliary (load-balancing) loss is off by default in RL (algo.router_aux_loss_coef = 0):
the pretrained router is already balanced, RL steps are few and small, and the aux gradient is not
part of the policy objective, so it would bias the policy-gradient estimate (docs/algorithms.md).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlcore.packing import Layout
from rollout.routing import RouterHooks, router_layers, unpack_router_output


def topk_weights(router: nn.Module, logits: Tensor, indices: Tensor, dtype: torch.dtype) -> Tensor:
    """The router's top-k weights for given expert ids, computed as the router computes its own.

    DeepSeek-V3 style (a score-correction bias): sigmoid scores, renormalised if norm_topk_prob, times
    routed_scaling_factor. Softmax routers (Qwen2/3-MoE, Mixtral): softmax probabilities, renormalised
    over the k when norm_topk_prob (Mixtral always). Checked per family against the routers' own
    output in tests/rlcore/test_moe.py.
    """
    if hasattr(router, "e_score_correction_bias"):
        w = logits.float().sigmoid().gather(1, indices)
        if router.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * router.routed_scaling_factor
    else:
        w = torch.softmax(logits.float(), dim=-1).gather(1, indices)
        if getattr(router, "norm_topk_prob", True):
            w = w / w.sum(-1, keepdim=True)
    return w.to(dtype)


def forced_layout(routing: list[Tensor], starts: list[int], total: int) -> Tensor:
    """(layers, total, k) long expert ids in the training forward's flattened (R * W = total) token grid,
    sequence b's record placed from starts[b] on (rlcore.packing.Layout), -1 where nothing was recorded.
    A record covers prompt + response - 1 tokens (the last token is never fed), a sequence ends at most
    there, so a record never runs into the next packed sequence."""
    layers, k = routing[0].shape[1:]
    out = torch.full((total, layers, k), -1, dtype=torch.long)
    ends = [*starts[1:], total]
    for start, end, rec in zip(starts, ends, routing):
        m = min(rec.shape[0], end - start)
        out[start : start + m] = rec[:m].long()
    return out.permute(1, 0, 2)


class RouterPass(RouterHooks):
    """Hooks on every router for the forward passes inside `with`: replays recorded routing (if
    `replay`), compares it with the model's own choice, counts expert load and collects the aux loss.

    valid: (N,) bool over the flattened (R * W) positions of the forward (padding excluded).
    forced: forced_layout(...) or None. A router called again for the same layer (gradient
    checkpointing recomputes the forward) overwrites that layer's statistics, so nothing counts twice.
    """

    def __init__(self, model: nn.Module, valid: Tensor, forced: Tensor | None, *, replay: bool, aux: bool):
        super().__init__(model)
        self.ordinal = {id(r): i for i, r in enumerate(self.routers)}  # index into the routing record
        self.layer_number = router_layers(model)  # decoder layer of each router, for metric names
        self.valid, self.forced, self.replay, self.aux = valid, forced, replay, aux
        self.counts: dict[int, Tensor] = {}  # decoder layer -> (E,) tokens routed to each expert
        self.mismatch: dict[int, tuple[float, float]] = {}  # layer -> (differing, compared) tokens
        self.aux_terms: dict[int, Tensor] = {}

    def _hook(self, module, inputs, output):
        logits, weights, idx = unpack_router_output(module, output)
        ordinal = self.ordinal[id(module)]
        layer = self.layer_number[ordinal]
        valid = self.valid.to(idx.device)
        if self.forced is not None:
            rec = self.forced[ordinal].to(idx.device)
            has = (rec[:, 0] >= 0) & valid
            same = (rec.sort(-1).values == idx.sort(-1).values).all(-1)
            self.mismatch[layer] = (float((~same & has).sum()), float(has.sum()))
            if self.replay:
                idx = torch.where(has[:, None], rec, idx)
                weights = topk_weights(module, logits, idx, weights.dtype)
        num_experts = logits.shape[-1]
        self.counts[layer] = torch.bincount(idx[valid].reshape(-1).cpu(), minlength=num_experts).float()
        if self.aux:
            self.aux_terms[layer] = _switch_loss(module, logits[valid], idx[valid], num_experts)
        return logits, weights, idx

    def aux_loss(self) -> Tensor:
        """Mean over layers of the Switch-style load-balancing loss (1 when perfectly balanced)."""
        return torch.stack(list(self.aux_terms.values())).mean()


def _switch_loss(router: nn.Module, logits: Tensor, idx: Tensor, num_experts: int) -> Tensor:
    """E * sum_e f_e * p_e: f_e = share of the k routing slots sent to expert e (no gradient), p_e =
    mean routing probability of e (softmax, or normalised sigmoid scores for sigmoid routers)."""
    if hasattr(router, "e_score_correction_bias"):
        scores = logits.float().sigmoid()
        probs = scores / scores.sum(-1, keepdim=True)
    else:
        probs = torch.softmax(logits.float(), dim=-1)
    f = torch.bincount(idx.reshape(-1), minlength=num_experts).float() / max(idx.numel(), 1)
    return num_experts * (f.detach() * probs.mean(0)).sum()


class LoadStats:
    """Expert-load and routing-mismatch totals over several RouterPasses -> moe/* metrics."""

    def __init__(self):
        self.counts: dict[int, Tensor] = {}
        self.differing = self.compared = 0.0

    def add(self, rp: RouterPass, *, mismatch: bool = True) -> None:
        for layer, c in rp.counts.items():
            self.counts[layer] = self.counts.get(layer, 0) + c
        if mismatch:
            for d, n in rp.mismatch.values():
                self.differing, self.compared = self.differing + d, self.compared + n

    def metrics(self) -> dict[str, float]:
        """Per layer: max_load_ratio = busiest expert's tokens / mean tokens per expert (1 = balanced)
        and usage_entropy = entropy of the expert-usage distribution / log(E) (1 = uniform);
        moe/max_load_ratio is the worst layer, moe/usage_entropy the layer mean; routing_mismatch =
        fraction of (token, layer) pairs whose top-k set differs between rollout and training."""
        out: dict[str, float] = {}
        for layer in sorted(self.counts):
            c = self.counts[layer]
            p = c / c.sum().clamp(min=1)
            out[f"moe/layer_{layer}/max_load_ratio"] = float(c.max() / c.mean().clamp(min=1e-9))
            entropy = -(p[p > 0] * p[p > 0].log()).sum()
            out[f"moe/layer_{layer}/usage_entropy"] = float(entropy / math.log(len(c)))
        if out:
            ratios = [v for k, v in out.items() if k.endswith("max_load_ratio")]
            entropies = [v for k, v in out.items() if k.endswith("usage_entropy")]
            out["moe/max_load_ratio"] = max(ratios)
            out["moe/usage_entropy"] = sum(entropies) / len(entropies)
        if self.compared:
            out["moe/routing_mismatch"] = self.differing / self.compared
        return out


@dataclass
class MoEForward:
    """What one training forward does with the routers; pass to rlcore.logprobs.response_logprobs."""

    routing: list[Tensor] | None
    """Recorded expert ids per row (RolloutBatch.routing), or None."""
    replay: bool
    """Force the recorded routing (algo.routing_replay)."""
    aux: bool
    """Compute the router aux loss (algo.router_aux_loss_coef > 0); it is left in aux_loss."""
    stats: LoadStats
    """Where expert counts (and, with mismatch, the routing mismatch) are added."""
    mismatch: bool = True
    aux_loss: Tensor | None = None

    @contextmanager
    def router_pass(self, model: nn.Module, layout: Layout):
        total = layout.num_grid_tokens
        forced = None if self.routing is None else forced_layout(self.routing, layout.starts, total)
        rp = RouterPass(model, layout.valid, forced, replay=self.replay, aux=self.aux)
        with rp:
            yield
        self.stats.add(rp, mismatch=self.mismatch)
        self.aux_loss = rp.aux_loss() if self.aux else None
