"""Shared fixtures: tiny locally built models, tokenizers and data files (nothing is downloaded)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # Warm starts are cached; tests must not read or fill the user's cache.
    os.environ["RLCORE_CACHE"] = str(tmp_path_factory.mktemp("rlcore-cache"))


def run_cli(*args: str, cwd: Path, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `rlcore` CLI in a subprocess (as a user would)."""
    proc = subprocess.run([sys.executable, "-m", "rlcore", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
    if check and proc.returncode != 0:
        raise AssertionError(f"rlcore {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory):
    """Factory: a tiny random-init model of a family, saved as a local Hugging Face folder."""
    from rlcore.models import char_tokenizer, tiny_model

    made = {}

    def make(family: str = "qwen2") -> Path:
        if family not in made:
            tok = char_tokenizer()
            model = tiny_model(len(tok), family=family, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_size=128, seed=1)
            path = tmp_path_factory.mktemp(f"model-{family}")
            model.save_pretrained(path)
            tok.save_pretrained(path)
            made[family] = path
        return made[family]

    return make


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked vllm need vLLM, which lives in an environment of its own (bash .ci/vllm): skipped here."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="needs vLLM: runs in CI's vLLM environment (bash .ci/vllm)")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)
