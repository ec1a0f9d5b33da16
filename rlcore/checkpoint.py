"""Checkpoints (atomic, last K kept, resumable on any rank count) and the self-checking export.

    RUN/checkpoints/step_000120/
        dcp/            torch.distributed.checkpoint: actor weights and optimizer state (and the
                        critic's), each rank writing its shards; loads on a different rank count
        model/          the model's config and tokenizer (the weights are in dcp/)
        trainer.pt      scheduler states (and the critic's)
        rng_<rank>.pt   each rank's RNG states
        state.json      step, data position
        config.yaml     the resolved config

A checkpoint is written into a hidden temporary folder and renamed into place, so a kill during a
save never leaves a partial folder that looks like a checkpoint. Every rank calls save and load
(they are collectives); rank 0 alone writes the small files and renames.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from rlcore import dist

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "state.json").is_file()]


@contextmanager
def _one_process_ok():
    """DCP warns that it assumes a single process when there is no process group: that is the point."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _training_state(model, optimizer, critic) -> dict:
    """What dcp/ holds, as state dicts of the (possibly sharded) modules: DTensors stay sharded."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    if critic is not None:
        state["critic"] = get_model_state_dict(critic.model)
        state["critic_optim"] = get_optimizer_state_dict(critic.model, critic.optimizer)
    return state


def save_checkpoint(run_dir: Path, step: int, *, model, tokenizer, optimizer, scheduler, data_state: dict,
                    config_yaml: str, keep_last: int, critic=None) -> Path:
    import torch.distributed.checkpoint as dcp

    root = run_dir / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    with _one_process_ok():
        dcp.save(_training_state(model, optimizer, critic), checkpoint_id=str(tmp / "dcp"))
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               tmp / f"rng_{dist.rank()}.pt")
    dist.barrier()
    if dist.is_main():
        model.config.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        if hasattr(model, "peft_config"):  # LoRA: the adapter's config, to rebuild the same module names
            model.peft_config[model.active_adapter].save_pretrained(tmp / "model")
        if critic is not None:
            critic.model.config.save_pretrained(tmp / "critic")
        torch.save({"scheduler": scheduler.state_dict(),
                    "critic_scheduler": None if critic is None else critic.scheduler.state_dict()}, tmp / "trainer.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        # state.json last: its presence marks the folder complete even before the rename.
        (tmp / "state.json").write_text(json.dumps({"step": step, "data": data_state,
                                                    "world_size": dist.world_size()}))
        _fsync_tree(tmp)
        if final.exists():  # a stale folder of a discarded trajectory at the same step
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stray in root.glob(".tmp_step_*"):  # leftovers of killed saves
            shutil.rmtree(stray, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(ckpt: Path, *, model, optimizer, scheduler, critic=None) -> dict:
    """Restore weights, optimizer, scheduler, critic and this rank's RNG; return state.json.

    The shards are resharded to this run's rank count; a rank the checkpoint had no RNG file for
    (more ranks now) keeps its own seeded RNG.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _training_state(model, optimizer, critic)
    with _one_process_ok():
        dcp.load(state, checkpoint_id=str(ckpt / "dcp"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    blob = torch.load(ckpt / "trainer.pt", weights_only=False)
    scheduler.load_state_dict(blob["scheduler"])
    if critic is not None:
        set_model_state_dict(critic.model, state["critic"])
        set_optimizer_state_dict(critic.model, critic.optimizer, state["critic_optim"])
        critic.scheduler.load_state_dict(blob["critic_scheduler"])
    rng_file = ckpt / f"rng_{dist.rank()}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((ckpt / "state.json").read_text())


def load_checkpoint_model(ckpt: Path):
    """The actor of a checkpoint on CPU, in one process (for export): a Hugging Face model, or a
    PeftModel when it was trained with LoRA adapters."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt / "model", local_files_only=True)
    dtype = getattr(config, "dtype", None)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if (ckpt / "model" / "adapter_config.json").is_file():
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig.from_pretrained(str(ckpt / "model")))
    state = {"model": model.state_dict()}
    with _one_process_ok():
        dcp.load(state, checkpoint_id=str(ckpt / "dcp"))
    model.load_state_dict(state["model"])
    return model


def _untied(model):
    """A copy of a tied model with the head as a tensor of its own (same values): what a model class that
    never ties (vLLM's DeepSeek) needs in the files. Only small models are tied this way (rlcore's tiny)."""
    import copy

    untied = copy.deepcopy(model)
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.get_input_embeddings().weight.detach().clone())
    return untied


def export_hf(model, tokenizer, out_dir: Path, *, atol: float | None = None, lora_export: str = "merged") -> float:
    """Write a Hugging Face folder and check it: reload it and compare logits on a few tokens.

    Refuses to write into an existing non-empty folder. Returns the max |logit difference|.
    A sharded model is gathered to rank 0 (the other ranks hold no copy; rank 0 one full copy on CPU,
    assigned into a model skeleton without copying); only rank 0 writes, and all ranks get the diff.
    A LoRA model is written merged (checked against the adapted model's own logits) or, with
    lora_export="adapter", as the adapter alone (reloaded over the base weights for the check).
    """
    from transformers import AutoModelForCausalLM

    from rlcore.lora import is_lora, merged_model
    from rollout.vllm_engine import UNTIED_HEAD_TYPES, vllm_readable

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"export folder {str(out_dir)!r} exists and is not empty; choose another one")
    if dist.active():
        model = _gather_to_main(model)
    diff = 0.0
    if dist.is_main():
        tmp = out_dir.with_name(f".tmp_{out_dir.name}_{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        adapted = model if is_lora(model) else None
        if adapted is not None and lora_export == "merged":
            model = merged_model(adapted)
        if model.config.model_type in UNTIED_HEAD_TYPES and model.config.tie_word_embeddings:
            model = _untied(model)  # vLLM would not tie them (real DeepSeek checkpoints are untied)
        vllm_readable(model.config)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if adapted is not None and lora_export == "adapter":
            reloaded = _reload_adapter(adapted, tmp)
            diff = _max_logit_diff(adapted, reloaded)
        else:
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=model.dtype, local_files_only=True)
            diff = _max_logit_diff(model, reloaded)  # the file against what was written: exact
            if adapted is not None:  # merged W + sBA against x W + s (x A) B: equal up to fp rounding
                merge = _max_logit_diff(adapted, reloaded)
                if not merge <= 1e-3:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise RuntimeError(f"export check failed: merged LoRA logits differ from the adapted model's "
                                       f"by {merge:.3g} (> 1e-3)")
        tol = atol if atol is not None else (1e-5 if model.dtype == torch.float32 else 1e-2)
        if not diff <= tol:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"export check failed: reloaded logits differ by {diff:.3g} (> {tol:g})")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    return float(dist.all_reduce(torch.tensor([diff]), "max").item())


def _reload_adapter(adapted, folder: Path):
    """The saved adapter over a copy of the base weights (what a user does with the base checkpoint)."""
    import copy

    from peft import PeftModel

    base = copy.deepcopy(adapted).unload()  # the base weights, adapters removed
    return PeftModel.from_pretrained(base, folder)


def _gather_to_main(model):
    """A plain copy of a sharded model on rank 0 (None elsewhere): the full state dict is gathered to
    rank 0's CPU and assigned into a meta-device skeleton, so rank 0 holds one full copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main():
        return None
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
    plain.load_state_dict(full, assign=True)
    plain.tie_weights()
    # Buffers outside the state dict (rotary inv_freq): FSDP does not shard buffers, so take them as is.
    for name, buf in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        target = plain.get_submodule(owner) if owner else plain
        if getattr(target, leaf).is_meta:
            target.register_buffer(leaf, buf.detach().cpu().clone(), persistent=False)
    plain.generation_config = model.generation_config
    return plain.eval()


@torch.no_grad()
def _max_logit_diff(model, reloaded) -> float:
    device = next(model.parameters()).device
    ids = torch.arange(min(16, model.config.vocab_size), device=device)[None] % model.config.vocab_size
    was_training = model.training
    model.eval()
    a = model(input_ids=ids).logits.float()
    b = reloaded.to(device).eval()(input_ids=ids).logits.float()
    model.train(was_training)
    return (a - b).abs().max().item()


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
