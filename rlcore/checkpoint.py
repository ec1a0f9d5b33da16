"""Checkpoints (atomic, last K kept, resumable) and the self-checking Hugging Face export.

    RUN/checkpoints/step_000120/
        model/          Hugging Face folder (safetensors, config, tokenizer, generation_config)
        critic/         the value model, when critic.enabled
        trainer.pt      optimizer, scheduler and RNG states
        state.json      step, data position
        config.yaml     the resolved config

A checkpoint is written into a hidden temporary folder and renamed into place, so a kill during a
save never leaves a partial folder that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "state.json").is_file()]


def save_checkpoint(run_dir: Path, step: int, *, model, tokenizer, optimizer, scheduler, data_state: dict,
                    config_yaml: str, keep_last: int, critic=None) -> Path:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "model")
    if critic is not None:
        critic.model.save_pretrained(tmp / "critic", safe_serialization=True)
    torch.save({
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "critic": None if critic is None else {"optimizer": critic.optimizer.state_dict(),
                                               "scheduler": critic.scheduler.state_dict()},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }, tmp / "trainer.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    # state.json last: its presence marks the folder complete even before the rename.
    (tmp / "state.json").write_text(json.dumps({"step": step, "data": data_state}))
    _fsync_tree(tmp)
    if final.exists():  # a stale folder of a discarded trajectory at the same step
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stray in root.glob(".tmp_step_*"):  # leftovers of killed saves
        shutil.rmtree(stray, ignore_errors=True)
    return final


def load_trainer_state(ckpt: Path, *, optimizer, scheduler, critic=None) -> dict:
    """Restore optimizer, scheduler, critic and RNG from a checkpoint; return its state.json."""
    blob = torch.load(ckpt / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if critic is not None:
        from rlcore.critic import load_value_model

        critic.model.load_state_dict(load_value_model(str(ckpt / "critic")).state_dict())
        critic.optimizer.load_state_dict(blob["critic"]["optimizer"])
        critic.scheduler.load_state_dict(blob["critic"]["scheduler"])
    rng = blob["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((ckpt / "state.json").read_text())


def export_hf(model, tokenizer, out_dir: Path, *, atol: float | None = None) -> float:
    """Write a Hugging Face folder and check it: reload it and compare logits on a few tokens.

    Refuses to write into an existing non-empty folder. Returns the max |logit difference|.
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"export folder {str(out_dir)!r} exists and is not empty; choose another one")
    tmp = out_dir.with_name(f".tmp_{out_dir.name}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=model.dtype, local_files_only=True)
    diff = _max_logit_diff(model, reloaded)
    tol = atol if atol is not None else (1e-5 if model.dtype == torch.float32 else 1e-2)
    if not diff <= tol:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"export check failed: reloaded logits differ by {diff:.3g} (> {tol:g})")
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(tmp, out_dir)
    return diff


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
