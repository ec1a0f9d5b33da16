"""The actor: the policy being trained, its optimizer, and the two things the RL step asks of it.

`logprobs` scores a rollout without gradients (old and reference log-probs); `update` runs the
epochs x mini-batches of the policy loss with gradient accumulation over token-budget micro-batches.
Losses are normalised by global token / sequence counts of the mini-batch (algos.aggregate), so the
gradient does not depend on how a mini-batch is cut into micro-batches.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from algos import KL_ESTIMATORS, POLICY_LOSSES, aggregate
from rlcore.batch import TrainBatch, split_by_tokens
from rlcore.config import RLConfig
from rlcore.logprobs import response_logprobs


def build_optimizer(model, cfg: RLConfig):
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    warmup = t.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return optimizer, scheduler


def micro_batches(prompt_ids, mask, max_tokens: int) -> list[list[int]]:
    lengths = [len(p) + int(n) for p, n in zip(prompt_ids, mask.sum(-1).tolist())]
    return split_by_tokens(lengths, max_tokens)


@torch.no_grad()
def batched_logprobs(model, prompt_ids, response_ids, mask, *, temperature: float, pad_id: int,
                     max_tokens: int) -> torch.Tensor:
    """(B, T) log-probs of a whole rollout, computed micro-batch by micro-batch (no grad)."""
    was_training = model.training
    model.eval()
    out = torch.zeros(mask.shape)
    for idx in micro_batches(prompt_ids, mask, max_tokens):
        T = max(1, int(mask[idx].sum(-1).max().item()))
        logp, _ = response_logprobs(model, [prompt_ids[i] for i in idx], response_ids[idx, :T], mask[idx, :T],
                                    temperature=temperature, pad_id=pad_id)
        out[idx, :T] = logp.cpu()
    model.train(was_training)
    return out


class Actor:
    def __init__(self, model, cfg: RLConfig, *, pad_id: int, seqs_per_minibatch: int):
        self.model, self.cfg, self.pad_id = model, cfg, pad_id
        self.seqs_per_minibatch = seqs_per_minibatch
        self.optimizer, self.scheduler = build_optimizer(model, cfg)

    def logprobs(self, prompt_ids, response_ids, mask) -> torch.Tensor:
        return batched_logprobs(self.model, prompt_ids, response_ids, mask, temperature=self.cfg.rollout.temperature,
                                pad_id=self.pad_id, max_tokens=self.cfg.train.max_tokens_per_microbatch)

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """Epochs x mini-batches of optimizer steps over the batch; returns actor/* metrics."""
        t = self.cfg.train
        self.model.train()
        sums: dict[str, float] = defaultdict(float)
        num_updates = 0
        for _ in range(t.epochs_per_step):
            # Shuffle only when there is more than one update, else keep rollout order (cheaper, same math).
            many = t.epochs_per_step * t.minibatches_per_step > 1
            order = torch.randperm(len(batch)).tolist() if many else list(range(len(batch)))
            for start in range(0, len(batch), self.seqs_per_minibatch):
                stats = self._minibatch_step(batch.select(order[start : start + self.seqs_per_minibatch]))
                for k, v in stats.items():
                    sums[k] += v
                num_updates += 1
        metrics = {f"actor/{k}": v / num_updates for k, v in sums.items()}
        metrics["actor/lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def _minibatch_step(self, mini: TrainBatch) -> dict[str, float]:
        a, t = self.cfg.algo, self.cfg.train
        # Global counts of the mini-batch: the sum of micro-batch losses is the mini-batch loss.
        counts = {"num_tokens": mini.mask.sum(), "num_seqs": (mini.mask.sum(-1) > 0).sum(),
                  "norm_len": self.cfg.rollout.max_new_tokens}
        # VAPO's NLL term is a token mean over the positive samples' tokens of the whole mini-batch.
        num_nll_tokens = None if mini.nll_mask is None else mini.nll_mask.sum().clamp(min=1)
        num_tokens = max(float(counts["num_tokens"]), 1.0)
        device = next(self.model.parameters()).device
        stats: dict[str, float] = defaultdict(float)
        self.optimizer.zero_grad(set_to_none=True)
        for idx in micro_batches(mini.prompt_ids, mini.mask, t.max_tokens_per_microbatch):
            micro = mini.select(idx)
            mask = micro.mask.to(device)
            logp, entropy = response_logprobs(self.model, micro.prompt_ids, micro.response_ids, micro.mask,
                                              temperature=self.cfg.rollout.temperature, pad_id=self.pad_id,
                                              with_entropy=True)
            pg_loss, pg_stats = POLICY_LOSSES[a.policy_loss.name](
                logprobs=logp, old_logprobs=micro.old_logprobs.to(device), advantages=micro.advantages.to(device),
                mask=mask, clip_low=a.policy_loss.clip_low, clip_high=a.policy_loss.clip_high,
                dual_clip=a.policy_loss.dual_clip, agg=a.aggregation, **counts,
                is_weights=None if micro.is_weights is None else micro.is_weights.to(device))
            entropy_term = aggregate(entropy if a.entropy_coef else entropy.detach(), mask, a.aggregation, **counts)
            loss = pg_loss - a.entropy_coef * entropy_term
            if a.kl.coef > 0 and a.kl.placement == "loss":
                kl = KL_ESTIMATORS[a.kl.estimator](logp, micro.ref_logprobs.to(device))
                kl_term = aggregate(kl, mask, a.aggregation, **counts)
                loss = loss + a.kl.coef * kl_term
                stats["kl"] += kl_term.item()
            if num_nll_tokens is not None and a.positive_nll_coef > 0:
                nll = -(logp * micro.nll_mask.to(device)).sum() / num_nll_tokens
                loss = loss + a.positive_nll_coef * nll
                stats["positive_nll"] += nll.item()
            loss.backward()
            # Losses already carry the global normalisation: they add up; ratios are token-weighted.
            share = float(micro.mask.sum()) / num_tokens
            stats["pg_loss"] += pg_loss.item()
            stats["entropy"] += float((entropy.detach() * mask).sum()) / num_tokens
            for k, v in pg_stats.items():
                stats[k] += v * share
        max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        self.optimizer.step()
        self.scheduler.step()
        return stats
