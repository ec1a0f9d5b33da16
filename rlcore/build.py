"""Building what a run needs from the config: tokenizer, initial policy, data."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from rlcore.config import RLConfig
from rlcore.data import Prompts, load_prompts
from rlcore.models import DTYPES, char_tokenizer, load_model, load_tokenizer, tiny_model
from rlcore.warmstart import cache_key, cache_root, cached_warmstart


VLLM_MIN_PARAMS_ON_CPU = 5_000_000
"""rollout.engine=auto on CPU picks vllm from this many parameters up. bench/vllm_vs_hf.py, idle 2-core
CPU, vllm/hf generated tokens/s: 0.41 at the quickstart's 0.4M, 1.66 at 9.4M, 1.75 at 23.6M, 1.90 at 104M
(whole RL step 1.45, 0.85, 0.83, 0.85); the crossover lies between, 5M is on the safe side of 9.4M."""


def choose_engine(cfg: RLConfig, model, device: str) -> tuple[str, str]:
    """(engine name, why) for rollout.engine; "auto" picks by what bench/vllm_vs_hf.py measured: vllm where it is
    installed and on a GPU, or on CPU for models of VLLM_MIN_PARAMS_ON_CPU and more whose head size vLLM's CPU
    kernels support and that need no routing replay (vLLM's CPU build cannot return routing); hf otherwise."""
    name = cfg.rollout.engine
    if name != "auto":
        return name, "rollout.engine"
    import importlib.util

    from rollout.vllm_engine import fits_cpu_kernels

    if importlib.util.find_spec("vllm") is None:
        return "hf", "auto: vLLM is not installed"
    if device == "cuda":
        return "vllm", "auto: vLLM on a GPU"
    params = sum(p.numel() for p in model.parameters())
    if params < VLLM_MIN_PARAMS_ON_CPU:
        return "hf", f"auto: {params / 1e6:.1f}M parameters, faster with hf on CPU below {VLLM_MIN_PARAMS_ON_CPU / 1e6:.0f}M"
    if cfg.algo.routing_replay or not fits_cpu_kernels(model.config):
        return "hf", "auto: vLLM's CPU build cannot run this model (head size) or record its routing"
    return "vllm", f"auto: {params / 1e6:.1f}M parameters on CPU"


def build_tokenizer(cfg: RLConfig):
    if cfg.model.path is None:
        return char_tokenizer()
    return load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)


def build_policy(cfg: RLConfig, tokenizer, train: Prompts, device: str):
    """The initial policy: a local checkpoint or the tiny built-in model, then the optional warm start."""
    m = cfg.model
    if m.path is None:
        t = m.tiny
        model = tiny_model(len(tokenizer), family=t.family, hidden_size=t.hidden_size, num_layers=t.num_layers,
                           num_heads=t.num_heads, num_kv_heads=t.num_kv_heads, intermediate_size=t.intermediate_size,
                           num_experts=t.num_experts, experts_per_token=t.experts_per_token,
                           expert_intermediate_size=t.expert_intermediate_size, seed=cfg.trainer.seed,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        source = {"tiny": dataclasses.asdict(t), "tokenizer": "char-v1"}
    else:
        model = load_model(m.path, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
        source = {"path": str(Path(m.path).resolve()), "mtime": os.path.getmtime(Path(m.path, "config.json"))}
    model.to(device)
    if m.warmstart.steps > 0:
        w = m.warmstart
        key = {"model": source, "data": _data_identity(cfg), "warmstart": dataclasses.asdict(w),
               "seed": cfg.trainer.seed, "version": 1}
        model = cached_warmstart(model, tokenizer, train, key, steps=w.steps, lr=w.lr, batch_size=w.batch_size,
                                 target_key=w.target_key, until_accuracy=w.until_accuracy, check_every=w.check_every,
                                 seed=cfg.trainer.seed,
                                 device=device)
    if m.path is None:  # built (and warm-started) in fp32, then cast like a loaded checkpoint
        model.to(DTYPES[m.dtype])
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def _data_identity(cfg: RLConfig) -> dict:
    d = cfg.data
    if not d.train_files:
        return {"task": dataclasses.asdict(d.task), "chat": d.apply_chat_template}
    files = {f: os.path.getmtime(f) for f in d.train_files}
    return {"files": files, "prompt_key": d.prompt_key, "messages_key": d.messages_key, "chat": d.apply_chat_template}


def build_data(cfg: RLConfig, tokenizer, tools: list[dict] | None = None) -> tuple[Prompts, Prompts | None]:
    """(train, held-out) prompts; tools: rollout.tools' JSON schemas, rendered by the chat template."""
    return load_prompts(cfg.data, tokenizer, seed=cfg.trainer.seed, tools=tools or None)


def reward_specs(cfg: RLConfig, tokenizer) -> list[tuple[str, float, dict]]:
    """(name, weight, args) per reward term; a reward model with path 'tiny' is built for the policy's
    tokenizer (random init, seeded; for CPU recipes and tests) and cached like the warm start."""
    specs = []
    for term in cfg.reward.terms:
        args = dict(term.args)
        if term.name in ("orm", "prm") and args.get("path") == "tiny":
            args["path"] = str(_tiny_reward_model(term.name, args.get("convention", "qwen"), tokenizer, cfg))
        specs.append((term.name, term.weight, args))
    return specs


def _tiny_reward_model(name: str, convention: str, tokenizer, cfg: RLConfig) -> Path:
    from rewards.orm import build_tiny_orm
    from rewards.prm import build_tiny_prm

    source = cfg.model.path and str(Path(cfg.model.path).resolve())
    key = {"reward_model": name, "convention": convention if name == "prm" else None,
           "tokenizer": source or "char-v1", "seed": cfg.trainer.seed, "version": 1}
    folder = cache_root() / "tiny-reward" / cache_key(key)
    if not (folder / "config.json").is_file():
        model, tok = build_tiny_prm(tokenizer, convention=convention, seed=cfg.trainer.seed) if name == "prm" \
            else build_tiny_orm(tokenizer, seed=cfg.trainer.seed)
        tmp = folder.with_name(f".tmp_{folder.name}_{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another run built the same model first
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
