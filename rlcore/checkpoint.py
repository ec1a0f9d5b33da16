"""Checkpoints (atomic, last K kept, resumable on any rank count) and the self-checking export.

    RUN/checkpoints/step_000120/
        dcp/            torch.distributed.checkpoint: actor weights and optimizer state (and the
                        critic's), each rank writing its shards; loads on a different rank count
        model/          the model's config and tokenizer (the weights are in dcp/)
        trainer.pt      scheduler states (and the critic's)
        rng_<rank>.pt   each rank's RNG states
        state.json      step, data position
        config.yaml     the resolved config
        manifest.json   every other file with its size and SHA-256, written last (rlcore.manifest)

A checkpoint is written into a hidden temporary folder and renamed into place, so a kill during a
save never leaves a partial folder that looks like a checkpoint; it counts as complete when its
manifest verifies, so a file damaged after the save is found before anything loads it. Weights holding
NaN or inf are never saved. Every rank calls save and load (they are collectives); rank 0 alone
writes the small files and renames.
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
from rlcore.guard import check_finite_weights
from rlcore.manifest import FORMAT, MANIFEST, DamagedCheckpoint, verify, write_manifest

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first: those with a manifest or a state.json (whether they
    verify is `newest_verified`'s question)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / MANIFEST).is_file() or (p / "state.json").is_file()]


def newest_verified(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of a run that verifies (rlcore.manifest), and one line per newer one
    skipped, saying why. Every rank calls it (the files are checked in shares)."""
    skipped = []
    for folder in reversed(checkpoint_dirs(run_dir)):
        try:
            if not verify(folder):
                skipped.append(f"{folder.name} has no manifest (written before rlcore verified checkpoints); "
                               "its files are present, loading it unverified")
            return folder, skipped
        except DamagedCheckpoint as e:
            skipped.append(f"skipped {folder.name}: {e}")
    return None, skipped


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
                    config_yaml: str, keep_last: int, critic=None, extra_state: dict | None = None) -> Path:
    """Write checkpoint `step` (see the module docstring); `extra_state` joins state.json (e.g. the
    texts the export checks the tokenizer on). Raises NonFiniteError before writing anything when a
    weight is NaN or inf."""
    import torch.distributed.checkpoint as dcp

    check_finite_weights(f"checkpoint step {step}", model, None if critic is None else critic.model)
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
        (tmp / "state.json").write_text(json.dumps({"step": step, "data": data_state, "world_size": dist.world_size(),
                                                    "format": FORMAT, **(extra_state or {})}))
    dist.barrier()
    write_manifest(tmp)  # last: the folder is complete when its manifest verifies
    if dist.is_main():
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
    """Restore weights, optimizer, scheduler, critic and this rank's RNG; return state.json. The
    caller verifies the folder first (newest_verified, or verify_or_raise for a named folder).

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
    PeftModel when it was trained with LoRA adapters. The checkpoint must verify (DamagedCheckpoint
    names the bad file)."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM

    verify(ckpt)
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
