"""Cross-field rules, checked once before any model loads. Each error names the key to change."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from rlcore.config import RLConfig
from rlcore.models import DTYPES, FAMILIES, MOE_FAMILIES
from rlcore.recipe import ConfigError
from rlcore.tasks import TASKS


@dataclass(frozen=True)
class Plan:
    """Sizes derived from the config, computed once here (units in the names)."""

    world_size: int
    prompts_per_rank: int
    seqs_per_step: int
    """All ranks: prompts_per_step x samples_per_prompt."""
    seqs_per_minibatch_per_rank: int
    device: str


def validate(cfg: RLConfig, world_size: int = 1) -> Plan:
    """Raise ConfigError listing every broken rule, or return the derived sizes."""
    from algos import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
    from rollout import ENGINES

    errors: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    def one_of(key: str, value, valid) -> None:
        need(value in valid, f"{key}={value!r} is not one of {sorted(valid)}")

    m, d, r, a, t, tr = cfg.model, cfg.data, cfg.rollout, cfg.algo, cfg.train, cfg.trainer
    # --- model and data
    one_of("model.dtype", m.dtype, DTYPES)
    if m.path is not None:
        need(Path(m.path, "config.json").is_file(),
             f"model.path={m.path!r} is not a local Hugging Face checkpoint folder (no config.json)")
    else:
        one_of("model.tiny.family", m.tiny.family, set(FAMILIES))
        if m.tiny.family in MOE_FAMILIES:
            need(0 < m.tiny.experts_per_token <= m.tiny.num_experts,
                 "model.tiny.experts_per_token must be in [1, model.tiny.num_experts]")
            need(m.tiny.family != "deepseek_v3" or m.tiny.num_experts % 2 == 0,
                 "model.tiny.num_experts must be even for deepseek_v3 (2 expert groups)")
        need(m.tiny.hidden_size % m.tiny.num_heads == 0, "model.tiny.hidden_size must divide by model.tiny.num_heads")
        need(m.tiny.num_heads % m.tiny.num_kv_heads == 0, "model.tiny.num_heads must divide by model.tiny.num_kv_heads")
    need(m.warmstart.steps >= 0, "model.warmstart.steps must be >= 0")
    need(0 <= m.warmstart.until_accuracy <= 1, "model.warmstart.until_accuracy must be in [0, 1]")
    need(m.warmstart.check_every >= 1, "model.warmstart.check_every must be >= 1")
    for key in ("train_files", "eval_files"):
        for f in getattr(d, key):
            need(Path(f).exists(), f"data.{key}: file {f!r} does not exist")
    if not d.train_files:
        one_of("data.task.name", d.task.name, TASKS)
        one_of("data.task.answer_format", d.task.answer_format, getattr(TASKS.get(d.task.name), "FORMATS", ("plain",)))
        need(d.task.num_train > 0 and d.task.num_eval >= 0, "data.task.num_train must be > 0")
    need(d.max_prompt_tokens > 0, "data.max_prompt_tokens must be > 0")
    # --- rollout
    one_of("rollout.engine", r.engine, {*ENGINES, "auto"})
    one_of("rollout.mode", r.mode, {"auto", "generate", "paged"})
    if r.engine == "vllm":
        from rollout.vllm_engine import NEEDS

        need(importlib.util.find_spec("vllm") is not None, f"{NEEDS} (vllm is not installed here)")
        need(tr.device != "cpu" or not torch.cuda.is_available(),
             "rollout.engine=vllm with trainer.device=cpu on a GPU machine: vLLM would run on the GPU; "
             "set trainer.device=auto")
    need(0 < r.gpu_memory_utilization < 1 and r.sleep_level in (1, 2),
         "rollout.gpu_memory_utilization must be in (0, 1) and rollout.sleep_level 1 or 2")
    need(r.kv_cache_gb is None or r.kv_cache_gb > 0, "rollout.kv_cache_gb must be > 0 (or unset)")
    if r.dtype is not None:
        one_of("rollout.dtype", r.dtype, DTYPES)
    gpu = tr.device == "cuda" or (tr.device == "auto" and torch.cuda.is_available())
    need(not a.routing_replay or (r.mode != "paged" if r.engine != "vllm" else gpu),
         "algo.routing_replay=true needs the engine to record routing: rollout.engine=hf with rollout.mode "
         "generate or auto, or rollout.engine=vllm on a GPU (vLLM's CPU build cannot return routed experts)")
    need(a.router_aux_loss_coef >= 0, "algo.router_aux_loss_coef must be >= 0")
    need(r.samples_per_prompt >= 2 or cfg.critic.enabled,
         f"rollout.samples_per_prompt={r.samples_per_prompt}: group-relative advantages need at least 2 "
         "samples per prompt (a single sample always gets advantage 0); or set critic.enabled=true")
    need(r.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1")
    need(r.temperature > 0,
         f"rollout.temperature={r.temperature}: RL sampling needs temperature > 0 (greedy groups are identical)")
    need(0 < r.top_p <= 1, f"rollout.top_p={r.top_p} must be in (0, 1]")
    need(r.top_k >= 0, f"rollout.top_k={r.top_k} must be >= 0 (0 = off)")
    need(r.sync_bucket_mb > 0, "rollout.sync_bucket_mb must be > 0")
    errors += _tool_errors(cfg)
    # --- algorithm
    one_of("algo.estimator", a.estimator, ADVANTAGES)
    one_of("algo.policy_loss.name", a.policy_loss.name, POLICY_LOSSES)
    one_of("algo.aggregation", a.aggregation, AGGREGATIONS)
    one_of("algo.kl.estimator", a.kl.estimator, KL_ESTIMATORS)
    need(0 <= a.policy_loss.clip_low < 1, f"algo.policy_loss.clip_low={a.policy_loss.clip_low} must be in [0, 1)")
    need(a.policy_loss.clip_high >= 0, "algo.policy_loss.clip_high must be >= 0")
    dual = a.policy_loss.dual_clip
    need(dual is None or dual > 1, f"algo.policy_loss.dual_clip={dual} must be > 1 (or unset)")
    need(a.kl.coef >= 0, "algo.kl.coef must be >= 0 (0 = off)")
    one_of("algo.kl.placement", a.kl.placement, {"loss", "reward"})
    need(a.kl.placement == "loss" or cfg.critic.enabled,
         "algo.kl.placement=reward puts the KL into token rewards for GAE; it needs critic.enabled=true")
    need(a.kl.target is None or (a.kl.target > 0 and a.kl.placement == "reward" and a.kl.coef > 0),
         "algo.kl.target adapts the KL-in-reward coefficient: it needs algo.kl.placement=reward and algo.kl.coef > 0")
    need(a.kl.horizon > 0, "algo.kl.horizon must be > 0")
    need(0 <= a.gamma <= 1 and 0 <= a.lam <= 1, "algo.gamma and algo.lam must be in [0, 1]")
    need(a.lam_critic is None or 0 <= a.lam_critic <= 1, "algo.lam_critic must be in [0, 1] (or unset)")
    need(a.lam_length_alpha >= 0 and a.positive_nll_coef >= 0,
         "algo.lam_length_alpha and algo.positive_nll_coef must be >= 0 (0 = off)")
    need(cfg.critic.enabled or (a.lam_critic is None and a.lam_length_alpha == 0 and cfg.critic.pretrain_steps == 0),
         "algo.lam_critic, algo.lam_length_alpha and critic.pretrain_steps shape GAE and the critic; they need "
         "critic.enabled=true")
    need(cfg.critic.pretrain_steps >= 0, "critic.pretrain_steps must be >= 0")
    c = cfg.critic
    need(c.path is None or Path(c.path, "config.json").is_file(),
         f"critic.path={c.path!r} is not a local Hugging Face folder (no config.json)")
    need(c.lr > 0 and c.warmup_steps >= 0 and c.value_clip > 0,
         "critic.lr and critic.value_clip must be > 0, critic.warmup_steps >= 0")
    need(a.filter.max_rounds >= 1, "algo.filter.max_rounds must be >= 1")
    need(0 <= a.shaping.overlong_cache_tokens < r.max_new_tokens,
         f"algo.shaping.overlong_cache_tokens={a.shaping.overlong_cache_tokens} must be in [0, rollout.max_new_tokens)")
    one_of("algo.rollout_correction.level", a.rollout_correction.level, {"none", "token", "sequence"})
    need(a.rollout_correction.cap > 0, "algo.rollout_correction.cap must be > 0")
    # --- rewards: names resolve and user files exist, before any model loads
    need(len(cfg.reward.terms) > 0, "reward.terms is empty; name at least one reward")
    errors += _reward_errors(cfg)
    need(cfg.reward.timeout_s > 0 and cfg.reward.num_workers >= 1,
         "reward.timeout_s must be > 0 and reward.num_workers >= 1")
    # --- batch sizes
    need(tr.nproc >= 1, "trainer.nproc must be >= 1")
    need(tr.nproc in (1, world_size),
         f"trainer.nproc={tr.nproc} but this process is one of {world_size} ranks started by torchrun; "
         "leave trainer.nproc=1 under torchrun")
    one_of("trainer.sharding", tr.sharding, {"zero3", "zero2", "replicate"})
    lo = m.lora
    need(lo.rank >= 0 and lo.alpha > 0 and 0 <= lo.dropout < 1,
         "model.lora.rank must be >= 0, model.lora.alpha > 0, model.lora.dropout in [0, 1)")
    one_of("model.lora.export", lo.export, {"merged", "adapter"})
    need(lo.rank == 0 or world_size == 1, "model.lora.rank > 0 with several ranks is not available yet; use "
         "trainer.nproc=1 or full fine-tuning")
    need(lo.rank == 0 or not m.gradient_checkpointing,
         "model.gradient_checkpointing with LoRA is not wired yet; set one of them off")
    need(not tr.offload or tr.device != "cpu", "trainer.offload=true moves GPU memory to the CPU; on CPU set it false")
    if world_size > 1:
        need(a.estimator != "reinforce_pp",
             "algo.estimator=reinforce_pp whitens over the batch of one rank; with several ranks use grpo, drgrpo "
             "or rloo (group statistics stay on a rank), or trainer.nproc=1")
    need(t.prompts_per_step >= 1 and t.prompts_per_step % world_size == 0,
         f"train.prompts_per_step={t.prompts_per_step} must be a positive multiple of the rank count {world_size}")
    seqs_per_rank = t.prompts_per_step // max(world_size, 1) * r.samples_per_prompt
    need(t.minibatches_per_step >= 1 and seqs_per_rank % t.minibatches_per_step == 0,
         f"train.minibatches_per_step={t.minibatches_per_step} must divide the {seqs_per_rank} samples per "
         "step and rank (prompts_per_step / ranks x samples_per_prompt)")
    need(t.epochs_per_step >= 1, "train.epochs_per_step must be >= 1")
    need(t.lr > 0, "train.lr must be > 0")
    need(t.warmup_steps >= 0 and t.weight_decay >= 0 and t.max_grad_norm >= 0,
         "train.warmup_steps, train.weight_decay and train.max_grad_norm must be >= 0")
    need(t.max_tokens_per_microbatch >= d.max_prompt_tokens + r.max_new_tokens,
         f"train.max_tokens_per_microbatch={t.max_tokens_per_microbatch} must hold one full sequence "
         f"(data.max_prompt_tokens + rollout.max_new_tokens = {d.max_prompt_tokens + r.max_new_tokens})")
    # --- trainer
    need(tr.total_steps >= 1, "trainer.total_steps must be >= 1")
    out = tr.output_dir
    need(out is None or not Path(out).exists() or Path(out).is_dir(),
         f"trainer.output_dir={out!r} is an existing file, not a folder; name a new folder or an earlier run's")
    need(t.max_nonfinite_updates >= 0, "train.max_nonfinite_updates must be >= 0 (0 = never stop)")
    need(cfg.reward.max_failed_steps >= 0, "reward.max_failed_steps must be >= 0 (0 = never stop)")
    need(tr.resume in ("auto", "never") or Path(tr.resume).is_dir(),
         f"trainer.resume={tr.resume!r}: use auto, never, or an existing checkpoint folder")
    need(tr.save_every >= 0 and tr.keep_last >= 1, "trainer.save_every must be >= 0 and trainer.keep_last >= 1")
    need(tr.log_every >= 1 and tr.eval_every >= 0 and tr.sample_text_every >= 0,
         "trainer.log_every must be >= 1; trainer.eval_every and trainer.sample_text_every >= 0")
    one_of("trainer.device", tr.device, {"auto", "cpu", "cuda"})
    need(tr.device != "cuda" or torch.cuda.is_available(), "trainer.device=cuda but no CUDA device is visible")
    if errors:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {e}" for e in errors))
    device = "cuda" if tr.device == "cuda" or (tr.device == "auto" and torch.cuda.is_available()) else "cpu"
    return Plan(
        world_size=world_size,
        prompts_per_rank=t.prompts_per_step // world_size,
        seqs_per_step=t.prompts_per_step * r.samples_per_prompt,
        seqs_per_minibatch_per_rank=seqs_per_rank // t.minibatches_per_step,
        device=device,
    )


def _tool_errors(cfg: RLConfig) -> list[str]:
    """Multi-turn rollouts: turns, tools, their format and what needs the chat template."""
    from rlcore.toolcall import FORMATS

    r, errors = cfg.rollout, []
    if r.max_turns < 1:
        errors.append("rollout.max_turns must be >= 1 (1 = single-turn)")
    if not r.tools:
        if r.max_turns > 1:
            errors.append(f"rollout.max_turns={r.max_turns} but rollout.tools is empty: a turn only follows a tool "
                          "call; add tools (docs/tools.md) or set rollout.max_turns=1")
        return errors
    if r.max_turns < 2:
        errors.append("rollout.tools needs rollout.max_turns >= 2: the model reads a tool's output in its next turn")
    if r.tool_format not in FORMATS:
        errors.append(f"rollout.tool_format={r.tool_format!r} is not one of {list(FORMATS)}")
    if r.tool_timeout_s <= 0 or r.tool_workers < 1:
        errors.append("rollout.tool_timeout_s must be > 0 and rollout.tool_workers >= 1")
    d = cfg.data
    if not (d.apply_chat_template or d.messages_key):
        errors.append("rollout.tools: tool turns are inserted through the chat template, so the prompts must be "
                      "too: set data.apply_chat_template=true (or data.messages_key)")
    if any(t.name in ("prm",) and t.args.get("dense") for t in cfg.reward.terms):
        errors.append("a dense prm reward term with rollout.tools is not supported: its steps are found in one "
                      "turn's text; use the prm as an outcome score (dense: false) or no tools")
    try:
        from rlcore.tools import tool_specs

        specs = tool_specs(r.tools)
        if r.tool_format == "python_block" and "python" not in [s.exposed for s in specs]:
            errors.append("rollout.tool_format=python_block calls the tool named python; add {name: python} to "
                          "rollout.tools")
    except Exception as e:  # unknown tool, missing file or function, bad args or schema, no sandbox
        errors.append(str(e))
    return errors


def _reward_errors(cfg: RLConfig) -> list[str]:
    from rewards import resolve_reward
    from rewards.model_terms import MODEL_REWARDS

    errors, dense = [], []
    for i, term in enumerate(cfg.reward.terms):
        if term.name in MODEL_REWARDS:  # a reward model: its folder must exist before anything loads
            path = term.args.get("path")
            if path != "tiny" and not (isinstance(path, str) and Path(path, "config.json").is_file()):
                errors.append(f"reward.terms[{i}].args.path={path!r}: {term.name} needs a local Hugging Face "
                              "checkpoint folder (with config.json), or 'tiny' for a random-init test model")
            if term.args.get("dense"):
                dense.append(i)
            continue
        try:
            resolve_reward(term.name)
        except Exception as e:  # unknown name, missing file, missing function: all config errors
            errors.append(f"reward.terms[{i}].name={term.name!r}: {e}")
    if len(dense) > 1:
        errors.append(f"reward.terms[{dense[1]}].args.dense: only one prm term may be dense "
                      f"(reward.terms[{dense[0]}] is)")
    return errors
