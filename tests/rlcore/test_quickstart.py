"""The quickstart as a newcomer runs it: `rlcore train` with no arguments in an empty folder.

Checks the issue's numbers: RL raises held-out accuracy by at least 20 points and the whole run,
warm start included, finishes within 10 minutes on 2 CPU cores.
"""

import json
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_quickstart_learns(tmp_path):
    start = time.perf_counter()
    proc = run_cli("train", cwd=tmp_path, timeout=900)
    seconds = time.perf_counter() - start
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["eval_before"]["accuracy"], summary["eval_after"]["accuracy"]
    print(f"quickstart: accuracy {before:.3f} -> {after:.3f} in {seconds:.0f}s")
    assert after - before >= 0.20, proc.stdout
    assert seconds < 600
    assert "held-out accuracy" in proc.stdout

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    prefixes = {tag.split("/")[0] for tag in acc.Tags()["scalars"]}
    assert {"reward", "actor", "timing", "response", "eval", "perf", "sync"} <= prefixes
    assert acc.Tags()["tensors"], "no sample text"
    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    tok = AutoTokenizer.from_pretrained(run / "hf")
    out = model.generate(**tok("21+14=", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 6
