"""The shared benchmark workload (issue "Benchmarks and the fast paths"), built once for every bench script.

Qwen2-shaped random-init model (hidden 256, 4 layers, 8 heads, 2 KV heads, intermediate 688, tied
embeddings, seed 0) over the character tokenizer, 2-digit addition prompts, 16 prompts x 8 samples,
at most 32 new tokens, temperature 1, one optimizer step per RL step, no KL.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, run as a script

MODEL = {"hidden_size": 256, "num_layers": 4, "num_heads": 8, "num_kv_heads": 2, "intermediate_size": 688}
PROMPTS_PER_STEP, SAMPLES_PER_PROMPT, MAX_NEW_TOKENS, TEMPERATURE = 16, 8, 32, 1.0
LR, SEED, NUM_TRAIN_ROWS = 2e-4, 0, 20000


def rlcore_overrides(extra: list[str] = ()) -> list[str]:
    """Quickstart recipe + key=value overrides that make it this workload."""
    return [
        "model.tiny.family=qwen2", *(f"model.tiny.{k}={v}" for k, v in MODEL.items()),
        "model.warmstart.steps=0",
        f"data.task.num_train={NUM_TRAIN_ROWS}",
        f"train.prompts_per_step={PROMPTS_PER_STEP}",
        f"rollout.samples_per_prompt={SAMPLES_PER_PROMPT}",
        f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
        f"rollout.temperature={TEMPERATURE}",
        "rollout.mode=generate",
        "train.minibatches_per_step=1",
        "train.epochs_per_step=1",
        f"train.lr={LR}",
        "algo.kl.coef=0",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "trainer.sample_text_every=0",
        "trainer.export=false",
        "trainer.device=cpu",
        f"trainer.seed={SEED}",
        *extra,
    ]


def build_rlcore_trainer(extra_overrides: list[str] = ()):
    """The real rlcore Trainer for this workload (config composed, validated and frozen like `rlcore train`)."""
    from rlcore.config import freeze
    from rlcore.recipe import compose
    from rlcore.trainer import Trainer
    from rlcore.validate import validate

    cfg, _ = compose("quickstart", rlcore_overrides(list(extra_overrides)))
    plan = validate(cfg)
    freeze(cfg)
    return Trainer(cfg, plan, scratch_dir("rlcore-bench-"))


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed at exit (the benches save nothing; trainers still want a run folder)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return Path(path)


def build_model(tokenizer):
    """The workload model, built exactly as rlcore builds it (same init for a given seed)."""
    from rlcore.models import tiny_model

    return tiny_model(len(tokenizer), family="qwen2", hidden_size=MODEL["hidden_size"], num_layers=MODEL["num_layers"],
                      num_heads=MODEL["num_heads"], num_kv_heads=MODEL["num_kv_heads"],
                      intermediate_size=MODEL["intermediate_size"], seed=SEED,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def addition_rows(num_rows: int = NUM_TRAIN_ROWS) -> list[dict[str, str]]:
    """The same 2-digit addition rows rlcore's quickstart trains on ({"prompt": "37+45=", "answer": "82"})."""
    from rlcore.tasks import Arithmetic

    return Arithmetic(num_digits=2, ops="+").rows("train", num_rows, SEED)


def num_params(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
