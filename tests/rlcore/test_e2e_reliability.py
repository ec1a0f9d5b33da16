"""Runs that lose nothing, through the real CLI (issue 13): a diverging run stops with finite checkpoints,
one run per folder, damaged checkpoints skipped and named, Ctrl-C, and a reward that always fails."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import REPO, run_cli
from rlcore.checkpoint import checkpoint_dirs, load_checkpoint_model

pytestmark = pytest.mark.slow

SHORT = ["model.warmstart.steps=0", "train.prompts_per_step=8", "rollout.samples_per_prompt=4",
         "rollout.max_new_tokens=6", "data.task.num_train=200", "data.task.num_eval=16", "trainer.sample_text_every=0"]
REWARDS = {
    "varied": "def score(prompt, response, row):\n    return float(len(response) % 3)\n",
    "slow": "import time\ndef score(prompt, response, row):\n    time.sleep(0.05)\n    return 0.0\n",
    "hang": "import time\ndef score(prompt, response, row):\n    time.sleep(1000)\n    return 0.0\n",
    "broken": "def score(prompt, response, row):\n    return row['answr']\n",
}


def reward(tmp_path, name):
    (tmp_path / f"{name}.py").write_text(REWARDS[name])
    return f"reward.terms=[{{name: 'python:{tmp_path / name}.py:score'}}]"


def start(tmp_path, *args):
    """`rlcore train` in the background, stderr to a file (read while it runs)."""
    err = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
    proc = subprocess.Popen([sys.executable, "-m", "rlcore", "train", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=err.open("w"), env={**os.environ, "PYTHONPATH": str(REPO)})
    return proc, err


def wait_for(condition, what, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_diverging_run_skips_its_updates_stops_and_leaves_finite_checkpoints(tmp_path):
    """The issue's command: lr 1e3 made every weight NaN, saved that, and crashed in sampling."""
    run = tmp_path / "run"
    proc = run_cli("train", *SHORT, reward(tmp_path, "varied"), "train.lr=1e3", "trainer.total_steps=8",
                   "trainer.save_every=1", f"trainer.output_dir={run}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"error: stopped at RL step \d: 3 actor updates in a row had a non-finite loss or gradient "
                     r"norm .*the last finite one was at RL step \d", proc.stderr)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(m.get("actor/skipped_steps", 0) for m in logged) >= 2
    assert checkpoint_dirs(run)
    for folder in checkpoint_dirs(run):  # every checkpoint written holds finite weights
        model = load_checkpoint_model(folder)
        assert all(torch.isfinite(p).all() for p in model.parameters()), folder
    exported = run_cli("export", str(run), str(tmp_path / "hf"), cwd=tmp_path)
    assert json.loads(exported.stdout)["max_logit_diff"] == 0.0


def test_one_run_per_folder_and_a_damaged_checkpoint_is_skipped_and_named(tmp_path):
    run = tmp_path / "run"
    args = [*SHORT, "trainer.save_every=1", "trainer.export=false", f"trainer.output_dir={run}"]
    first, _ = start(tmp_path, *args, reward(tmp_path, "slow"), "trainer.total_steps=200")
    try:
        wait_for(lambda: len(checkpoint_dirs(run)) >= 2, "two checkpoints")
        second = run_cli("train", *args, "trainer.total_steps=2", cwd=tmp_path, check=False)
        assert second.returncode == 2 and f"in use by another rlcore run (pid {first.pid} " in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)  # no clean-up at all: the lock must not outlive it
        first.wait()

    # Damage the newest checkpoint the way a full disk or a killed copy would.
    older, newest = checkpoint_dirs(run)[-2:]
    shard = newest / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    exported = run_cli("export", str(newest), str(tmp_path / "hf"), cwd=tmp_path, check=False)
    assert exported.returncode == 2 and "Traceback" not in exported.stderr
    assert f"{shard} is 1000 bytes, the manifest says" in exported.stderr

    step = int(newest.name.split("_")[1])
    resumed = run_cli("train", *args, reward(tmp_path, "varied"), f"trainer.total_steps={step}", cwd=tmp_path)
    assert f"skipped {newest.name}: {shard} is 1000 bytes" in resumed.stderr
    assert f"resumed from {older} (step {step - 1})" in resumed.stderr


def test_ctrl_c_stops_cleanly_with_the_checkpoint_and_the_command_that_resumes(tmp_path):
    run = tmp_path / "run"
    args = [*SHORT, reward(tmp_path, "slow"), "trainer.total_steps=200", "trainer.save_every=2",
            "trainer.export=false", f"trainer.output_dir={run}"]
    proc, err = start(tmp_path, *args)
    metrics = run / "metrics.jsonl"
    wait_for(lambda: (run / "checkpoints" / "step_000002").exists() and metrics.exists()
             and len(metrics.read_text().splitlines()) >= 4, "step 3")
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers, "no reward worker processes"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    stderr = err.read_text()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    line = stderr.strip().splitlines()[-1]
    done = int(re.search(r"^interrupted in step \d+/200 \(steps 1-(\d+) done\)", line).group(1))
    last = checkpoint_dirs(run)[-1]
    assert f"last complete checkpoint {last}; resume with: " in line and int(last.name[5:]) <= done
    command = shlex.split(line.split("resume with: ")[1])
    assert command == ["rlcore", "train", *args[:-1], f"trainer.output_dir={run}"]
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, alive


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    """The first Ctrl-C waits for the reward call in flight (here one that hangs); the second does not."""
    args = [*SHORT, reward(tmp_path, "hang"), "reward.timeout_s=300", f"trainer.output_dir={tmp_path / 'run'}"]
    proc, err = start(tmp_path, *args)
    wait_for(lambda: "run folder" in err.read_text(), "the run to start")
    time.sleep(1.0)  # scoring the held-out prompts: the reward hangs
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "interrupted before step 1/" in err.read_text(), "the stop line", timeout=30)
    time.sleep(0.5)
    assert proc.poll() is None  # still cleaning up: waiting for the hung reward call
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=5) == 130
    assert "second Ctrl-C: exiting now" in err.read_text()


def test_a_reward_that_fails_on_every_sample_stops_the_run_with_its_error(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", *SHORT, reward(tmp_path, "broken"), "trainer.total_steps=10", "trainer.export=false",
                   f"trainer.output_dir={run}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert ("stopped at RL step 3: reward term 'broken.score' (reward.terms[0]) failed on every sample for 3 steps "
            "in a row") in proc.stderr and "KeyError: 'answr'" in proc.stderr
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "reward/mean" in m] == [1, 2, 3]
