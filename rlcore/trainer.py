"""The trainer: one RL step, visible top to bottom, and the loop around it.

Every rank runs the same code (SPMD). An algorithm is a preset of the knobs this step reads
(estimator or critic, policy loss, aggregation, KL placement, filters, shaping); there is no trainer
per algorithm.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import nullcontext
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from algos import (ADVANTAGES, KL_ESTIMATORS, adaptive_kl_coef, gae, grpo_process_advantages, last_masked_index,
                   length_adaptive_lambda, masked_whiten, rollout_mismatch_metrics, step_token_rewards,
                   truncated_is_weights)
from rewards import CompositeReward
from rlcore import checkpoint as ckpt
from rlcore import dist
from rlcore.actor import Actor, batched_logprobs
from rlcore.agent import AgentEngine, trajectory_markdown
from rlcore.batch import TrainBatch
from rlcore.build import build_data, build_policy, build_tokenizer, choose_engine, reward_specs
from rlcore.collect import collect
from rlcore.critic import Critic, build_value_model, load_value_model
from rlcore.config import RLConfig
from rlcore.data import DataError, Prompts, PromptSampler
from rlcore.evaluate import evaluate
from rlcore.guard import RewardTermWatch
from rlcore.logprobs import ResponseScorer
from rlcore.lora import apply_lora
from rlcore.metrics import Timer, Tracker
from rlcore.models import DTYPES
from rlcore.recipe import ConfigError, to_yaml
from rlcore.sharding import shard
from rlcore.sync import sync_weights, verify_rollout_logprobs
from rlcore.tools import ToolRunner, tool_specs
from rlcore.validate import Plan
from rollout import ENGINES, SamplingParams
from rollout.routing import routers


class Trainer:
    def __init__(self, cfg: RLConfig, plan: Plan, run_dir: Path):
        self.cfg, self.plan, self.run_dir = cfg, plan, run_dir
        seed_everything(cfg.trainer.seed + dist.rank())  # models are built from their own seeds: equal on all ranks
        self.tokenizer = build_tokenizer(cfg)
        tools = tool_specs(cfg.rollout.tools)  # their schemas go into the prompts' chat template
        self.train_prompts, self.eval_prompts = build_data(cfg, self.tokenizer, [t.schema for t in tools])
        check_enough_prompts(cfg, len(self.train_prompts))
        policy = build_policy(cfg, self.tokenizer, self.train_prompts, plan.device)
        lora = cfg.model.lora.rank > 0
        # The reference is the initial policy, frozen; kept only when a KL term needs it (with LoRA it is
        # the actor with its adapters disabled: no copy).
        ref = _frozen(copy.deepcopy(policy)) if cfg.algo.kl.coef > 0 and not lora else None
        is_moe = bool(routers(policy))
        if cfg.algo.routing_replay and not is_moe:
            raise ConfigError("algo.routing_replay=true but the model has no MoE routers; set it false for dense "
                              "models")
        self.engine_name, self.engine_reason = choose_engine(cfg, policy, plan.device)
        engine_model = _frozen(copy.deepcopy(policy)).to(DTYPES[cfg.rollout.dtype or cfg.model.dtype])
        self.engine = ENGINES[self.engine_name](
            engine_model, eos_token_ids=eos_token_ids(self.tokenizer, policy),
            pad_token_id=self.tokenizer.pad_token_id, mode=cfg.rollout.mode,
            **({"record_routing": True} if is_moe and records_routing(self.engine_name, cfg.rollout.mode, plan.device)
               else {}),
            **(vllm_options(cfg, plan, self.train_prompts, self.eval_prompts) if self.engine_name == "vllm" else {}))
        # With tools the trainer drives the agent loop, which drives the engine turn by turn.
        self.tools = ToolRunner(tools, timeout_s=cfg.rollout.tool_timeout_s, num_workers=cfg.rollout.tool_workers) \
            if tools else None
        self.rollout_engine = self.engine if self.tools is None else AgentEngine(
            self.engine, self.tokenizer, self.tools, max_turns=cfg.rollout.max_turns,
            tool_format=cfg.rollout.tool_format)
        value_model = build_value(cfg, policy)  # from the whole policy, before it is sharded
        if lora:
            policy = apply_lora(policy, cfg.model.lora)
        # Scoring modules (the FSDP roots when sharded): the actor's and the reference's.
        scorer, self.ref = ResponseScorer(policy), None if ref is None else ResponseScorer(ref)
        if plan.world_size > 1:
            tr = cfg.trainer
            opts = dict(strategy=tr.sharding, device=plan.device, offload=tr.offload,
                        mixed_precision=tr.mixed_precision)
            shard(scorer, policy, **opts)
            if self.ref is not None:
                shard(self.ref, ref, **opts)
            if value_model is not None:
                shard(value_model, value_model, **opts)
        self.actor = Actor(policy, cfg, pad_id=self.tokenizer.pad_token_id,
                           seqs_per_minibatch=plan.seqs_per_minibatch_per_rank, scorer=scorer)
        self.critic = build_critic(cfg, value_model, pad_id=self.tokenizer.pad_token_id,
                                   seqs_per_minibatch=plan.seqs_per_minibatch_per_rank)
        self.sampler = PromptSampler(len(self.train_prompts), seed=cfg.trainer.seed, rank=dist.rank(),
                                     world_size=plan.world_size)
        self.reward_fn = CompositeReward(reward_specs(cfg, self.tokenizer), timeout_s=cfg.reward.timeout_s,
                                         num_workers=cfg.reward.num_workers, device=plan.device)
        self.reward_watch = RewardTermWatch(self.reward_fn.keys, cfg.reward.max_failed_steps)
        r = cfg.rollout
        self.sampling = SamplingParams(n=r.samples_per_prompt, max_new_tokens=r.max_new_tokens,
                                       temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                       stop_token_ids=tuple(stop_token_ids(self.tokenizer, r.stop)))
        self.timer = Timer(plan.device)
        self.step, self.eval_before = 0, None
        self.overlap_rewards = overlap_rewards(cfg.reward, plan.device)
        self.kl_coef = cfg.algo.kl.coef  # the KL-in-reward coefficient; adapted when algo.kl.target is set

    # ------------------------------------------------------------------ the RL step
    def rl_step(self) -> dict[str, float]:
        cfg, t = self.cfg, self.timer
        # 1-2. rollout: stream the actor's weights into the engine (bucketed), wake it to sample
        with t("sync"):
            self.engine.wake()
            sync_metrics = self._sync()

        # 1-4. prompts -> n samples each -> rewards; DAPO dynamic sampling repeats this to fill the step.
        #      Without it the rewards are still being scored (in the reward workers) during step 5.
        collecting = collect(cfg=cfg, sampler=self.sampler, prompts=self.train_prompts, engine=self.rollout_engine,
                             sampling=self.sampling, tokenizer=self.tokenizer, reward_fn=self.reward_fn, timer=t,
                             overlap=self.overlap_rewards)
        self.engine.sleep()
        batch = collecting.batch

        # 5. log-probs: old (the actor now; exactly on-policy, the update's own), reference (if KL);
        #    check them against the engine's
        updating = self.step >= cfg.critic.pretrain_steps
        on_policy = updating and self._exactly_on_policy(len(batch))
        with t("logprobs"):
            old_logprobs = None
            if not on_policy:
                old_logprobs, moe_metrics = self.actor.logprobs(batch.prompt_ids, batch.response_ids, batch.mask,
                                                                routing=batch.routing, lengths=batch.lengths)
                sync_metrics |= moe_metrics
            ref_logprobs = self._ref_logprobs(batch) if cfg.algo.kl.coef > 0 else None
            if old_logprobs is not None:
                sync_metrics |= verify_rollout_logprobs(batch, old_logprobs, cfg, self.tokenizer)
            is_weights, correction_metrics = self._rollout_correction(batch, old_logprobs)
        if self.critic is not None:
            with t("values"):
                values = self.critic.values(batch.prompt_ids, batch.response_ids, batch.mask, batch.lengths)

        rollout = collecting.result()  # waits for the rewards (the "reward" phase)
        scores, steps = rollout.scores, rollout.steps  # steps: dense PRM rewards or None

        # 6. advantages: group-relative from scores (+ process advantages from PRM steps, spec §2.2),
        #    or GAE over token rewards with the critic (PPO; PRM steps on their last tokens, spec §6)
        with t("advantages"):
            if self.critic is None:
                advantages = ADVANTAGES[cfg.algo.estimator](scores=scores, group_ids=batch.group_ids, mask=batch.mask)
                if steps is not None:
                    advantages = advantages + grpo_process_advantages(
                        steps.rewards, steps.ends, steps.mask, batch.group_ids, batch.mask)
            else:
                advantages, returns, kl_metrics = self._gae(batch, scores, steps, old_logprobs, ref_logprobs, values)
                correction_metrics |= kl_metrics

        # 7. update (VAPO value pretraining: the critic alone for its first steps)
        update_metrics = {}
        positive = batch.mask * (scores > 0)[:, None] if cfg.algo.positive_nll_coef else None  # VAPO NLL
        if updating:
            with t("update"):
                update_metrics, policy_logprobs = self.actor.update(TrainBatch(
                    prompt_ids=batch.prompt_ids, response_ids=batch.response_ids, mask=batch.mask,
                    old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, advantages=advantages,
                    is_weights=is_weights, nll_mask=positive, routing=batch.routing, lengths=batch.lengths))
            if on_policy:  # the update's first forward was the old policy: check the engine against it
                sync_metrics |= verify_rollout_logprobs(batch, policy_logprobs, cfg, self.tokenizer)
        if self.critic is not None:
            with t("critic"):
                update_metrics |= self.critic.update(
                    batch.prompt_ids, batch.response_ids, batch.mask, returns, values,
                    epochs=cfg.train.epochs_per_step, minibatches=cfg.train.minibatches_per_step,
                    lengths=batch.lengths)

        # 8. record (metrics over all ranks); lengths count the policy's own tokens (not tool output)
        lengths = batch.mask.sum(-1)
        self._last = rollout
        return dist.reduce_metrics({
            **rollout.metrics, **update_metrics, **sync_metrics, **correction_metrics,
            "response/length_mean": lengths.mean().item(), "response/length_max": lengths.max().item(),
            "response/clipped_ratio": batch.is_truncated.float().mean().item(),
            "data/epoch": float(self.sampler.epoch), "data/dropped_prompts": float(self.train_prompts.num_dropped),
            "data/unencodable_prompts": float(self.train_prompts.num_unencodable),
            "perf/generated_tokens": lengths.sum().item(),
        })

    def _gae(self, batch, scores, steps, old_logprobs, ref_logprobs, values):
        """PPO / VAPO advantages (whitened) and critic returns from token rewards and the values."""
        a, mask = self.cfg.algo, batch.mask
        rewards = score_rewards(scores, mask)
        if steps is not None:  # process rewards: each step's score on its last token
            rewards = rewards + step_token_rewards(steps.rewards, steps.ends, steps.mask, mask)
        metrics = {}
        if a.kl.placement == "reward" and self.kl_coef > 0:  # PPO: per-token KL penalty in the reward
            kl = KL_ESTIMATORS[a.kl.estimator](old_logprobs, ref_logprobs) * mask
            rewards = rewards - self.kl_coef * kl
            seq_kl = (kl.sum(-1) / mask.sum(-1).clamp(min=1)).mean().item()
            metrics = {"actor/kl_in_reward": seq_kl, "actor/kl_coef": self.kl_coef}
            if a.kl.target is not None:
                self.kl_coef = adaptive_kl_coef(self.kl_coef, seq_kl, target=a.kl.target, horizon=a.kl.horizon,
                                                num_samples=len(scores))
        lam = a.lam if not a.lam_length_alpha else length_adaptive_lambda(mask.sum(-1), alpha=a.lam_length_alpha)
        advantages, returns = gae(rewards, values, mask, gamma=a.gamma, lam=lam)
        if a.lam_critic is not None:  # VAPO decoupled GAE: the critic's own lambda for its targets
            _, returns = gae(rewards, values, mask, gamma=a.gamma, lam=a.lam_critic)
        return global_whiten(advantages, mask), returns, metrics

    def _ref_logprobs(self, batch) -> torch.Tensor:
        """The reference policy's log-probs: its own copy, or with LoRA the actor with adapters disabled."""
        scorer, off = (self.ref, nullcontext()) if self.ref is not None else \
            (self.actor.scorer, self.actor.model.disable_adapter())
        with off:
            return batched_logprobs(scorer, batch.prompt_ids, batch.response_ids, batch.mask,
                                    temperature=self.cfg.rollout.temperature, pad_id=self.tokenizer.pad_token_id,
                                    max_tokens=self.cfg.train.max_tokens_per_microbatch, lengths=batch.lengths,
                                    packed=self.cfg.train.packing)

    def _sync(self) -> dict[str, float]:
        r = self.cfg.rollout
        return sync_weights(self.actor.model, self.engine, bucket_mb=r.sync_bucket_mb, verify=r.verify_sync,
                            dtype=DTYPES[r.dtype or self.cfg.model.dtype])

    def _exactly_on_policy(self, num_rows: int) -> bool:
        """True when nothing needs the old log-probs before the update and the update is one optimizer
        step on the whole batch: its own log-probs, detached, are then the old ones bitwise."""
        c = self.cfg
        kl_in_reward = self.critic is not None and c.algo.kl.placement == "reward" and self.kl_coef > 0
        return (c.train.epochs_per_step == 1 and num_rows <= self.actor.seqs_per_minibatch
                and c.algo.rollout_correction.level == "none" and not kl_in_reward)

    def _rollout_correction(self, batch, old_logprobs):
        """Truncated importance weights pi_old / pi_rollout (algo.rollout_correction), or None."""
        c = self.cfg.algo.rollout_correction
        if c.level == "none":
            return None, {}
        weights = truncated_is_weights(old_logprobs, batch.rollout_logprobs, batch.mask, cap=c.cap, level=c.level)
        stats = rollout_mismatch_metrics(old_logprobs, batch.rollout_logprobs, batch.mask, weights)
        return weights, {f"rollout_corr/{k}": v for k, v in stats.items()}

    # ------------------------------------------------------------------ the loop
    def fit(self, tracker: Tracker) -> dict:
        cfg = self.cfg.trainer
        if self.eval_before is None and self.eval_prompts is not None:
            self.eval_before = self.evaluate()
            tracker.log(self.step, {f"eval/{k}": v for k, v in self.eval_before.items()})
            if dist.is_main():
                print(f"held-out accuracy before RL: {self.eval_before['accuracy']:.3f}", file=sys.stderr)
        start = time.perf_counter()
        while self.step < cfg.total_steps:
            step_start = time.perf_counter()
            for guard in self._update_guards():  # so that a non-finite stop names the step
                guard.rl_step = self.step + 1
            metrics = self.rl_step()
            self.step += 1
            seconds = time.perf_counter() - step_start
            metrics |= self.timer.pop() | {"timing/step": seconds}
            metrics["perf/tokens_per_s"] = metrics.pop("perf/generated_tokens") / max(metrics["timing/generate"], 1e-9)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.eval_prompts is not None:
                metrics |= {f"eval/{k}": v for k, v in self.evaluate().items()}
            if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
                tracker.log(self.step, metrics, extra={"prompt_indices": self._last.prompt_indices})
                tracker.progress(self.step, metrics)
            if cfg.sample_text_every and self.step % cfg.sample_text_every == 0:
                tracker.text(self.step, "samples", self._samples_markdown())
            self.reward_watch.observe(self.step, metrics, self._last.reward_errors)  # after logging the step
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.total_steps:
                self.save()
        summary = {"steps": self.step, "train_seconds": time.perf_counter() - start}
        if self.eval_prompts is not None:
            after = self.evaluate()
            tracker.log(self.step, {f"eval/{k}": v for k, v in after.items()})
            summary |= {"eval_before": self.eval_before, "eval_after": after}
        return summary

    def evaluate(self) -> dict[str, float]:
        """Greedy held-out accuracy; with several ranks each scores every world-size-th prompt."""
        self._sync()
        p, r, w = self.eval_prompts, dist.rank(), self.plan.world_size
        mine = Prompts(p.rows[r::w], p.texts[r::w], p.token_ids[r::w], p.num_dropped)
        result = {"accuracy": 0.0, "reward_mean": 0.0}
        if len(mine):
            result = evaluate(self.rollout_engine, self.reward_fn, mine, self.tokenizer,
                              max_new_tokens=self.cfg.rollout.max_new_tokens,
                              stop_token_ids=self.sampling.stop_token_ids)
        sums = dist.all_reduce(torch.tensor([result["accuracy"] * len(mine), result["reward_mean"] * len(mine),
                                             float(len(mine))], dtype=torch.float64))
        return {"accuracy": float(sums[0] / sums[2]), "reward_mean": float(sums[1] / sums[2])}

    def _update_guards(self):
        return [self.actor.guard] + ([self.critic.guard] if self.critic is not None else [])

    def probe_texts(self) -> list[str]:
        """Training text the export checks its tokenizer on: a few prompts and the last step's responses."""
        responses = [r for _, r, *_ in self._last.examples] if getattr(self, "_last", None) is not None else []
        return [*self.train_prompts.texts[:8], *responses]

    def _samples_markdown(self) -> str:
        examples = self._last.examples
        if any(t is not None for *_, t in examples):  # trajectories: one block each, tool turns marked
            return "\n\n---\n\n".join(trajectory_markdown(p, t, s) for p, _, s, t in examples)
        rows = [f"| {p!r} | {r!r} | {s:.3f} |" for p, r, s, _ in examples]
        return "| prompt | response | reward |\n|---|---|---|\n" + "\n".join(rows)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        return ckpt.save_checkpoint(
            self.run_dir, self.step, model=self.actor.model, tokenizer=self.tokenizer,
            optimizer=self.actor.optimizer, scheduler=self.actor.scheduler,
            data_state={**self.sampler.state_dict(), "eval_before": self.eval_before, "kl_coef": self.kl_coef},
            config_yaml=to_yaml(self.cfg), keep_last=self.cfg.trainer.keep_last, critic=self.critic,
            extra_state={"probe_texts": self.probe_texts()})

    def resume(self, folder: Path) -> None:
        state = ckpt.load_checkpoint(folder, model=self.actor.model, optimizer=self.actor.optimizer,
                                     scheduler=self.actor.scheduler, critic=self.critic)
        self.eval_before = state["data"].pop("eval_before")
        self.kl_coef = state["data"].pop("kl_coef")
        self.sampler.load_state_dict(state["data"])
        self.step = state["step"]

    def close(self, clean: bool = True) -> None:
        """Stop the reward workers and the engine. vLLM's shutdown destroys the process groups, the
        trainer's included: after a clean run the ranks first meet (see dist.shutdown for why)."""
        self.reward_fn.close()
        if self.tools is not None:
            self.tools.close()
        if hasattr(self.engine, "close"):
            if clean:
                dist.barrier()
            self.engine.close()


def records_routing(engine: str, mode: str, device: str) -> bool:
    """Whether the engine can record MoE routing (for replay and moe/routing_mismatch): hf except in
    its paged mode; vllm on a GPU (its CPU build cannot return routed experts)."""
    return mode != "paged" if engine == "hf" else device == "cuda"


def vllm_options(cfg: RLConfig, plan: Plan, train: Prompts, held_out: Prompts | None) -> dict:
    """The vllm engine's sizes: the longest prompt of the data (not the limit) plus the response budget,
    and every sequence of a step on this rank decoded at once."""
    r = cfg.rollout
    longest = max(len(ids) for prompts in (train, held_out) if prompts is not None for ids in prompts.token_ids)
    return {"max_model_len": longest + r.max_new_tokens, "seed": cfg.trainer.seed,
            "max_num_seqs": plan.prompts_per_rank * r.samples_per_prompt,
            "kv_cache_bytes": None if r.kv_cache_gb is None else int(r.kv_cache_gb * 2**30),
            "gpu_memory_utilization": r.gpu_memory_utilization, "sleep_level": r.sleep_level}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def eos_token_ids(tokenizer, model) -> list[int]:
    """The tokenizer's EOS plus the model's generation_config EOS ids (chat models often list several,
    e.g. an end-of-turn token besides end-of-text)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


def stop_token_ids(tokenizer, stops: list[str]) -> list[int]:
    ids = []
    for i, s in enumerate(stops):
        toks = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ValueError(f"rollout.stop[{i}]={s!r} is {len(toks)} tokens; each stop string must be one token")
        ids += toks
    return ids


def _frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_enough_prompts(cfg: RLConfig, num_prompts: int) -> None:
    """One step draws train.prompts_per_step distinct prompts; fewer would repeat prompts inside a step
    (its groups would not be independent), so refuse, naming where the prompts come from."""
    need = cfg.train.prompts_per_step
    if num_prompts >= need:
        return
    d = cfg.data
    source = f"data.train_files {d.train_files}" if d.train_files else f"data.task.num_train={d.task.num_train}"
    raise DataError(f"train.prompts_per_step={need} but {source} gives only {num_prompts} usable prompts, so one step "
                    f"would repeat prompts; lower train.prompts_per_step to at most {num_prompts}, or add prompts")


def write_summary(run_dir: Path, summary: dict) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))


def build_value(cfg: RLConfig, policy):
    """The critic's value model (critic.path, or the policy's trunk with a zero head), or None."""
    c = cfg.critic
    if not c.enabled:
        return None
    model = load_value_model(c.path) if c.path else build_value_model(policy)
    return model.to(next(policy.parameters()).device)


def build_critic(cfg: RLConfig, model, *, pad_id: int, seqs_per_minibatch: int) -> Critic | None:
    if model is None:
        return None
    c, t = cfg.critic, cfg.train
    return Critic(model, lr=c.lr, warmup_steps=c.warmup_steps,
                  weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, value_clip=c.value_clip,
                  aggregation=cfg.algo.aggregation, max_tokens_per_microbatch=t.max_tokens_per_microbatch,
                  seqs_per_minibatch=seqs_per_minibatch, pad_id=pad_id, norm_len=cfg.rollout.max_new_tokens,
                  max_nonfinite_updates=t.max_nonfinite_updates, packing=t.packing)


def global_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """algos.masked_whiten over the whole batch of all ranks (mean and unbiased variance all-reduced)."""
    if not dist.active():
        return masked_whiten(values, mask)
    valid = mask.bool()
    x = torch.where(valid, values, 0.0)
    sums = dist.all_reduce(torch.stack([x.sum(), valid.sum().float()]))
    mean = sums[0] / sums[1]
    sq = dist.all_reduce(torch.where(valid, (x - mean) ** 2, 0.0).sum().reshape(1))[0]
    var = sq / sums[1] * sums[1] / (sums[1] - 1)
    return torch.where(valid, (values - mean) * torch.rsqrt(var + 1e-8), 0.0)


def overlap_rewards(reward_cfg, device: str) -> bool:
    """reward.overlap, or when unset: whether the reward workers get cores the model passes leave free."""
    if reward_cfg.overlap is not None:
        return reward_cfg.overlap
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    needed = ranks_here * (torch.get_num_threads() + reward_cfg.num_workers)
    return device != "cpu" or needed <= (os.cpu_count() or 1)


def score_rewards(scores, mask) -> torch.Tensor:
    """(B, T) token rewards: each score on its sample's last trained token (spec §1.1; with tools the
    last token the policy sampled, never a tool's)."""
    last = last_masked_index(mask)  # (B,)
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(len(scores)), last] = scores * (mask.sum(-1) > 0)
    return rewards
