"""The critic: a token-level value model, its optimizer, and what the PPO / VAPO step asks of it.

`values` scores a rollout without gradients (V_old for GAE); `update` regresses V onto the GAE
returns with the clipped value loss (spec §1.5), epochs x mini-batches, with gradient accumulation
over token-budget micro-batches normalised by global counts, exactly like the actor's update.
V[b, t] is the value of the state before response token t: the head output at position
prompt_len + t − 1, the same position whose logits score token t (spec §0).
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForTokenClassification

from algos import masked_mean, value_loss
from rlcore import dist
from rlcore.actor import micro_batches, step_unless_nonfinite
from rlcore.batch import row_lengths
from rlcore.guard import UpdateGuard
from rlcore.logprobs import pack_inputs
from rlcore.sharding import scalar


def _value_config(config):
    """A copy of `config` for a 1-label token head without dropout (the PPO loss assumes a deterministic V)."""
    config = copy.deepcopy(config)
    config.num_labels = 1
    config.classifier_dropout = 0.0  # transformers' token-classification head defaults to dropout 0.1
    return config


def build_value_model(policy) -> torch.nn.Module:
    """Value model on the policy's trunk family, trunk weights copied from the policy, head zeroed (V ≡ 0)."""
    param = next(policy.parameters())
    model = AutoModelForTokenClassification.from_config(_value_config(policy.config), dtype=param.dtype)
    # Both models keep the decoder trunk under `base_model_prefix` ("model." for Qwen2 / Llama), so
    # the trunk state dicts share names once that prefix is stripped; strict loading asserts that every
    # trunk parameter is copied and none is left over.
    result = model.base_model.load_state_dict(policy.base_model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    torch.nn.init.zeros_(model.score.weight)
    if model.score.bias is not None:
        torch.nn.init.zeros_(model.score.bias)
    return model.to(param.device)


def load_value_model(path: str) -> torch.nn.Module:
    """A saved value model, or an outcome reward model (one-label sequence classifier: same trunk and
    `score` names), from a local folder; nothing is downloaded."""
    # Through the config: a reward model's saved config may lack classifier_dropout, and an unknown
    # keyword would reach the model's __init__.
    config = _value_config(AutoConfig.from_pretrained(path, local_files_only=True))
    return AutoModelForTokenClassification.from_pretrained(path, config=config, local_files_only=True)


def response_values(model, prompt_ids: list[list[int]], response_ids: Tensor, mask: Tensor, *,
                    pad_id: int, lengths: Tensor | None = None) -> Tensor:
    """V[b, t] at position prompt_len_b − 1 + t, (B, T) float32, 0 where mask is 0 (values exist for
    the states before the model's own tokens; lengths (B,): real tokens, rlcore.batch.row_lengths).

    Gradients flow when called under grad mode (the update); wrap in no_grad for V_old.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask, pos = pack_inputs(prompt_ids, response_ids, row_lengths(mask, lengths), pad_id)
    out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits[..., 0]  # (B, P)
    values = torch.gather(out.float(), 1, pos.to(device))  # (B, T)
    return values * mask.to(device=device, dtype=values.dtype)


def _rows(idx: list[int], prompt_ids, lengths: Tensor, *tensors: Tensor):
    """Rows `idx` of the prompts, of lengths (B,) and of each (B, T) tensor, T trimmed to the longest
    selected response (its real tokens)."""
    index = torch.tensor(idx, dtype=torch.long)
    T = max(1, int(lengths[index].max().item()))
    return [prompt_ids[i] for i in idx], lengths[index], *(t[index, :T] for t in tensors)


class Critic:
    def __init__(self, model, *, lr: float, warmup_steps: int, weight_decay: float, max_grad_norm: float,
                 value_clip: float, aggregation: str, max_tokens_per_microbatch: int, seqs_per_minibatch: int,
                 pad_id: int, norm_len: int | None = None, max_nonfinite_updates: int = 3):
        """`norm_len`: the constant of seq-mean-token-sum-norm (pass rollout.max_new_tokens, as the
        actor does); None uses the padded length T of the batch given to `update`.
        `max_nonfinite_updates`: skipped non-finite steps in a row that stop the run (rlcore.guard)."""
        self.model, self.pad_id = model, pad_id
        self.max_grad_norm, self.value_clip, self.aggregation = max_grad_norm, value_clip, aggregation
        self.max_tokens, self.seqs_per_minibatch = max_tokens_per_microbatch, seqs_per_minibatch
        self.norm_len = norm_len
        self.guard = UpdateGuard("critic", max_nonfinite_updates)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        # Linear warmup, the same schedule as rlcore.actor.build_optimizer with the critic's own lr/steps.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)

    @torch.no_grad()
    def values(self, prompt_ids: list[list[int]], response_ids: Tensor, mask: Tensor,
               lengths: Tensor | None = None) -> Tensor:
        """(B, T) values of a whole rollout on CPU, micro-batch by micro-batch (no grad); lengths (B,)
        real response tokens (None: rlcore.batch.row_lengths(mask))."""
        was_training = self.model.training
        self.model.eval()
        out = torch.zeros(mask.shape)
        lengths = row_lengths(mask, lengths)
        for idx in micro_batches(prompt_ids, lengths, self.max_tokens):
            prompts, micro_lengths, micro_mask, micro_ids = _rows(idx, prompt_ids, lengths, mask, response_ids)
            T = micro_mask.shape[1]
            out[idx, :T] = response_values(self.model, prompts, micro_ids, micro_mask, pad_id=self.pad_id,
                                           lengths=micro_lengths).cpu()
        self.model.train(was_training)
        return out

    def update(self, prompt_ids: list[list[int]], response_ids: Tensor, mask: Tensor, returns: Tensor,
               old_values: Tensor, *, epochs: int = 1, minibatches: int = 1, lengths: Tensor | None = None
               ) -> dict[str, float]:
        """Epochs x mini-batches (of `seqs_per_minibatch` rows) of critic steps; returns critic/* metrics.

        returns (GAE targets), old_values (V at rollout time), mask: (B, T); lengths (B,) as in values().
        """
        self.model.train()
        lengths = row_lengths(mask, lengths)
        norm_len = self.norm_len or mask.shape[1]
        sums: dict[str, float] = defaultdict(float)
        num_updates = 0
        B = len(prompt_ids)
        for _ in range(epochs):
            # Shuffle only when there is more than one update, like Actor.update.
            order = torch.randperm(B).tolist() if epochs * minibatches > 1 else list(range(B))
            for start in range(0, B, self.seqs_per_minibatch):
                idx = order[start : start + self.seqs_per_minibatch]
                stats = self._minibatch_step(*_rows(idx, prompt_ids, lengths, mask, response_ids, returns,
                                                    old_values), norm_len=norm_len)
                for k, v in stats.items():
                    sums[k] += v
                num_updates += 1
        metrics = {f"critic/{k}": v if k == "skipped_steps" else v / num_updates for k, v in sums.items()}
        # Explained variance of the pre-update values (population variances, as algos.value_loss).
        m = mask.float()
        var_returns = masked_mean((returns - masked_mean(returns, m)).square(), m)
        err = returns - old_values
        var_err = masked_mean((err - masked_mean(err, m)).square(), m)
        metrics["critic/explained_variance"] = float(1.0 - var_err / (var_returns + 1e-8))
        metrics["critic/lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def _minibatch_step(self, prompt_ids, lengths, mask, response_ids, returns, old_values, *, norm_len: int):
        # Global counts of the mini-batch (all ranks): the sum of micro-batch losses is the mini-batch loss.
        totals = dist.all_reduce(torch.stack([mask.sum(), (mask.sum(-1) > 0).sum().float()]))
        counts = {"num_tokens": totals[0], "num_seqs": totals[1], "norm_len": norm_len}
        num_tokens = max(float(counts["num_tokens"]), 1.0)
        device = next(self.model.parameters()).device
        stats: dict[str, float] = defaultdict(float)
        self.optimizer.zero_grad(set_to_none=True)
        for idx in micro_batches(prompt_ids, lengths, self.max_tokens):
            prompts, n, m, ids, ret, old = _rows(idx, prompt_ids, lengths, mask, response_ids, returns, old_values)
            values = response_values(self.model, prompts, ids, m, pad_id=self.pad_id, lengths=n)
            loss, loss_stats = value_loss(values, old.to(device), ret.to(device), m.to(device), clip=self.value_clip,
                                          agg=self.aggregation, **counts)
            (loss * dist.world_size()).backward()  # FSDP averages over ranks; the losses add up (rlcore.sharding)
            # The loss already carries the global normalisation: it adds up; means are token-weighted.
            share = float(m.sum()) / num_tokens
            stats["value_loss"] += loss.item()
            stats["vf_clipfrac"] += loss_stats["vf_clipfrac"] * share
            stats["value_mean"] += loss_stats["value_mean"] * share
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        stats["grad_norm"] = scalar(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        stats["skipped_steps"] += float(step_unless_nonfinite(self.optimizer, self.scheduler, self.guard,
                                                              stats["value_loss"], stats["grad_norm"]))
        return stats
