"""The actor: the policy being trained, its optimizer, and the two things the RL step asks of it.

`logprobs` scores a rollout without gradients (old and reference log-probs); `update` runs the
epochs x mini-batches of the policy loss with gradient accumulation over token-budget micro-batches.
When the update is exactly on-policy (one epoch, one mini-batch) the old log-probs are the update's
own, detached: `update` computes them on the way and returns them, saving a whole forward pass.
Losses are normalised by global token / sequence counts of the mini-batch (algos.aggregate), so the
gradient does not depend on how a mini-batch is cut into micro-batches.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from algos import KL_ESTIMATORS, POLICY_LOSSES, aggregate
from rlcore.batch import TrainBatch, row_lengths, split_by_tokens
from rlcore.config import RLConfig
from rlcore import dist
from rlcore.guard import UpdateGuard
from rlcore.logprobs import ResponseScorer, response_logprobs
from rlcore.moe import LoadStats, MoEForward
from rlcore.sharding import scalar
from rollout.routing import routers


def build_optimizer(model, cfg: RLConfig):
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    warmup = t.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return optimizer, scheduler


def micro_batches(prompt_ids, lengths, max_tokens: int) -> list[list[int]]:
    """Row indices of token-budget micro-batches; lengths (B,): real response tokens per row
    (rlcore.batch). With several ranks every rank gets as many as the
    rank that needs the most (FSDP gathers layers in each forward: the ranks must run in lockstep);
    the others split their largest micro-batches in half, which keeps them within the budget."""
    lengths = [len(p) + int(n) for p, n in zip(prompt_ids, lengths.tolist())]
    parts = split_by_tokens(lengths, max_tokens)
    count = int(dist.all_reduce(torch.tensor([len(parts)]), "max").item())
    while len(parts) < count:
        largest = max(range(len(parts)), key=lambda i: len(parts[i]))
        if len(parts[largest]) < 2:
            raise RuntimeError(f"this rank has {len(lengths)} rows, too few for the {count} micro-batches another "
                               "rank needs; give every rank the same number of samples")
        rows = parts.pop(largest)
        parts += [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    return parts


@torch.no_grad()
def batched_logprobs(model, prompt_ids, response_ids, mask, *, temperature: float, pad_id: int,
                     max_tokens: int, routing=None, replay: bool = False, stats: LoadStats | None = None,
                     lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) log-probs of a whole rollout's trained tokens, micro-batch by micro-batch (no grad).

    lengths (B,): real response tokens per row (None: rlcore.batch.row_lengths(mask)).
    MoE (stats given): routing per row is compared with the model's own routing, and forced if replay.
    """
    was_training = model.training
    model.eval()
    out = torch.zeros(mask.shape)
    lengths = row_lengths(mask, lengths)
    for idx in micro_batches(prompt_ids, lengths, max_tokens):
        T = max(1, int(lengths[idx].max().item()))
        moe = None if stats is None else MoEForward(
            routing=None if routing is None else [routing[i] for i in idx], replay=replay, aux=False, stats=stats)
        logp, _ = response_logprobs(model, [prompt_ids[i] for i in idx], response_ids[idx, :T], mask[idx, :T],
                                    temperature=temperature, pad_id=pad_id, moe=moe, lengths=lengths[idx])
        out[idx, :T] = logp.cpu()
    model.train(was_training)
    return out


class Actor:
    def __init__(self, model, cfg: RLConfig, *, pad_id: int, seqs_per_minibatch: int,
                 scorer: ResponseScorer | None = None):
        """scorer: the ResponseScorer around `model`, already sharded when training on several ranks
        (the optimizer is built over the parameters as they are then)."""
        self.model, self.cfg, self.pad_id = model, cfg, pad_id
        self.scorer = scorer if scorer is not None else ResponseScorer(model)
        self.seqs_per_minibatch = seqs_per_minibatch
        self.optimizer, self.scheduler = build_optimizer(model, cfg)
        self.guard = UpdateGuard("actor", cfg.train.max_nonfinite_updates)
        self.is_moe = bool(routers(model))
        self._load: LoadStats | None = None  # expert load over one update's forwards (MoE)

    def logprobs(self, prompt_ids, response_ids, mask, routing=None, lengths=None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        """Old log-probs (no grad) and, for MoE with recorded routing, moe/routing_mismatch."""
        stats = LoadStats() if self.is_moe else None
        logp = batched_logprobs(self.scorer, prompt_ids, response_ids, mask, temperature=self.cfg.rollout.temperature,
                                pad_id=self.pad_id, max_tokens=self.cfg.train.max_tokens_per_microbatch,
                                routing=routing, replay=self.cfg.algo.routing_replay, stats=stats, lengths=lengths)
        metrics = {} if stats is None else stats.metrics()
        return logp, {k: v for k, v in metrics.items() if k == "moe/routing_mismatch"}

    def update(self, batch: TrainBatch) -> tuple[dict[str, float], torch.Tensor | None]:
        """Epochs x mini-batches of optimizer steps over the batch.

        Returns actor/* metrics and, when batch.old_logprobs is None, the (B, T) log-probs of the
        policy before this update (the old log-probs), computed by the update's own forward.
        """
        t = self.cfg.train
        self.model.train()
        sums: dict[str, float] = defaultdict(float)
        num_updates = 0
        many = t.epochs_per_step * t.minibatches_per_step > 1
        if batch.old_logprobs is None and (t.epochs_per_step > 1 or self.seqs_per_minibatch < len(batch)):
            raise ValueError("old_logprobs may be omitted only for one epoch of one mini-batch (exactly on-policy)")
        record = torch.zeros(batch.mask.shape) if batch.old_logprobs is None else None
        self._load = LoadStats() if self.is_moe else None
        for _ in range(t.epochs_per_step):
            # Shuffle only when there is more than one update, else keep rollout order (cheaper, same math).
            order = torch.randperm(len(batch)).tolist() if many else list(range(len(batch)))
            for start in range(0, len(batch), self.seqs_per_minibatch):
                stats = self._minibatch_step(batch.select(order[start : start + self.seqs_per_minibatch]), record)
                for k, v in stats.items():
                    sums[k] += v
                num_updates += 1
        metrics = {f"actor/{k}": v if k == "skipped_steps" else v / num_updates for k, v in sums.items()}
        metrics["actor/lr"] = self.scheduler.get_last_lr()[0]
        if self._load is not None:  # expert load over the update; routing mismatch if it was the old pass
            metrics |= self._load.metrics()
        return metrics, record

    def _minibatch_step(self, mini: TrainBatch, record: torch.Tensor | None = None) -> dict[str, float]:
        """One optimizer step. With mini.old_logprobs None (on-policy, mini is the whole batch in rollout
        order) the detached log-probs serve as old ones and are written into `record`."""
        a, t = self.cfg.algo, self.cfg.train
        # Global counts of the mini-batch (all ranks): the sum of micro-batch losses over ranks is the
        # mini-batch loss, whatever the rank count (FSDP sums the gradients, rlcore.sharding).
        totals = dist.all_reduce(torch.stack([mini.mask.sum(), (mini.mask.sum(-1) > 0).sum().float(),
                                              mini.nll_mask.sum() if mini.nll_mask is not None else torch.tensor(0.)]))
        counts = {"num_tokens": totals[0], "num_seqs": totals[1], "norm_len": self.cfg.rollout.max_new_tokens}
        # VAPO's NLL term is a token mean over the positive samples' tokens of the whole mini-batch.
        num_nll_tokens = None if mini.nll_mask is None else totals[2].clamp(min=1)
        num_tokens = max(float(counts["num_tokens"]), 1.0)
        device = next(self.model.parameters()).device
        stats: dict[str, float] = defaultdict(float)
        total_loss = 0.0  # this rank's part of the mini-batch loss, every term included
        self.optimizer.zero_grad(set_to_none=True)
        for idx in micro_batches(mini.prompt_ids, mini.row_lengths, t.max_tokens_per_microbatch):
            micro = mini.select(idx)
            mask = micro.mask.to(device)
            # Losses already carry the global normalisation: they add up; ratios are token-weighted.
            share = float(micro.mask.sum()) / num_tokens
            moe = None if self._load is None else MoEForward(
                routing=micro.routing, replay=a.routing_replay, aux=a.router_aux_loss_coef > 0, stats=self._load,
                mismatch=micro.old_logprobs is None)  # on-policy: this pass is the old-log-prob pass
            logp, entropy = response_logprobs(self.scorer, micro.prompt_ids, micro.response_ids, micro.mask,
                                              temperature=self.cfg.rollout.temperature, pad_id=self.pad_id,
                                              with_entropy=True, entropy_grad=a.entropy_coef != 0, moe=moe,
                                              lengths=micro.row_lengths)
            if micro.old_logprobs is None:  # exactly on-policy: ratio 1 in value, gradient of logp
                old = logp.detach()
                record[idx, : old.shape[1]] = old.cpu()
            else:
                old = micro.old_logprobs.to(device)
            pg_loss, pg_stats = POLICY_LOSSES[a.policy_loss.name](
                logprobs=logp, old_logprobs=old, advantages=micro.advantages.to(device),
                mask=mask, clip_low=a.policy_loss.clip_low, clip_high=a.policy_loss.clip_high,
                dual_clip=a.policy_loss.dual_clip, agg=a.aggregation, **counts,
                is_weights=None if micro.is_weights is None else micro.is_weights.to(device))
            loss = pg_loss
            if a.entropy_coef:
                loss = loss - a.entropy_coef * aggregate(entropy, mask, a.aggregation, **counts)
            if a.kl.coef > 0 and a.kl.placement == "loss":
                kl = KL_ESTIMATORS[a.kl.estimator](logp, micro.ref_logprobs.to(device))
                kl_term = aggregate(kl, mask, a.aggregation, **counts)
                loss = loss + a.kl.coef * kl_term
                stats["kl"] += kl_term.item()
            if num_nll_tokens is not None and a.positive_nll_coef > 0:
                nll = -(logp * micro.nll_mask.to(device)).sum() / num_nll_tokens
                loss = loss + a.positive_nll_coef * nll
                stats["positive_nll"] += nll.item()
            if moe is not None and moe.aux_loss is not None:  # per micro-batch mean, weighted to the mini-batch
                loss = loss + a.router_aux_loss_coef * share * moe.aux_loss
                stats["router_aux_loss"] += moe.aux_loss.item() * share
            (loss * dist.world_size()).backward()  # FSDP averages over ranks; the losses add up (rlcore.sharding)
            total_loss += loss.item()
            stats["pg_loss"] += pg_loss.item()
            stats["entropy"] += float((entropy.detach() * mask).sum()) / num_tokens
            for k, v in pg_stats.items():
                stats[k] += v * share
        max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        stats["grad_norm"] = scalar(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        stats["skipped_steps"] += float(step_unless_nonfinite(self.optimizer, self.scheduler, self.guard,
                                                              total_loss, stats["grad_norm"]))
        return stats


def step_unless_nonfinite(optimizer, scheduler, guard: UpdateGuard, loss: float, grad_norm: float) -> bool:
    """Apply the accumulated gradients unless the loss or gradient norm is non-finite on some rank; then
    drop them and leave optimizer and schedule untouched (the update never happened). True if skipped."""
    if guard.should_skip(loss, grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return True
    optimizer.step()
    scheduler.step()
    return False
