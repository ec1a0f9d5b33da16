"""Multi-turn rollouts with tools through the real CLI: a model warm-started on tool-use traces calls the
calculator, the agent metrics and the marked trajectory reach TensorBoard, and a run killed with
SIGKILL in the middle of a step resumes exactly as the straight run went."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow

# One-digit additions answered through the calculator; a short warm start (cached: both runs share it)
# teaches the call's format, so tools are called from the first step.
TOOLS = ["data.apply_chat_template=true", "data.max_prompt_tokens=64", "data.task.num_digits=1",
         "data.task.answer_format=tool_calculator", "data.task.num_train=200", "data.task.num_eval=8",
         "model.warmstart.steps=150", "model.warmstart.until_accuracy=0", "model.warmstart.batch_size=32",
         "model.warmstart.lr=3e-3", "model.warmstart.target_key=target",
         "rollout.max_turns=3", "rollout.tools=[{name: calculator}]", "rollout.max_new_tokens=110",
         "train.prompts_per_step=4", "rollout.samples_per_prompt=4", "trainer.sample_text_every=1",
         "trainer.total_steps=4", "trainer.save_every=2", "trainer.export=false"]
AGENT = ("agent/turns_mean", "agent/tool_calls", "agent/tool_errors", "agent/tool_seconds", "agent/truncated")


def steps(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if "reward/mean" in json.loads(line)]


def test_tool_runs_log_agent_metrics_and_resume_after_sigkill_mid_step_exactly(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli("train", *TOOLS, f"trainer.output_dir={straight}", cwd=tmp_path)
    logged = steps(straight)
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert all(key in m for m in logged for key in AGENT)
    assert sum(m["agent/tool_calls"] for m in logged) > 0 and all(m["agent/turns_mean"] >= 1 for m in logged)
    acc = EventAccumulator(str(straight / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert {"agent/tool_calls", "timing/tools", "actor/pg_loss"} <= set(acc.Tags()["scalars"])
    texts = [e.tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"] if "samples" in tag
             for e in acc.Tensors(tag)]
    assert any("🔧 **[tool" in t and "**model:**" in t for t in texts)  # tool turns marked in the text panel

    proc = subprocess.Popen([sys.executable, "-m", "rlcore", "train", *TOOLS, f"trainer.output_dir={killed}"],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = killed / "metrics.jsonl", time.time() + 600
    while time.time() < deadline:  # step 3 logged after the step-2 checkpoint: step 4 is running
        done = [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
        if (killed / "checkpoints" / "step_000002").exists() and max(done, default=0) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    resumed = run_cli("train", *TOOLS, f"trainer.output_dir={killed}", cwd=tmp_path)
    assert "resumed from" in resumed.stderr
    again = steps(killed)
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    # The trajectories (turns, tool calls, tokens) follow the checkpointed RNG: the same numbers.
    for key in ("reward/mean", "response/length_mean", "actor/pg_loss", "actor/grad_norm", *AGENT[:3], AGENT[4]):
        assert [m[key] for m in again] == pytest.approx([m[key] for m in logged], abs=1e-6), key


def test_tools_on_two_ranks_each_with_its_own_workers(tmp_path):
    """nproc=2: each rank runs its own trajectories and tool workers; the agent metrics are summed or
    averaged over both ranks, the engine samples from the synced weights, the rows (tool tokens inside)
    are spread over the ranks by tokens and the update still runs in lockstep."""
    run = tmp_path / "run"
    proc = run_cli("train", *TOOLS, "trainer.nproc=2", "trainer.total_steps=2", f"trainer.output_dir={run}",
                   cwd=tmp_path)
    assert "x 2 ranks" in proc.stderr
    logged = steps(run)
    assert [m["step"] for m in logged] == [1, 2]
    assert sum(m["agent/tool_calls"] for m in logged) > 0
    for m in logged:
        assert m["reward/samples"] == 16  # 4 prompts x 4 samples, both ranks together
        assert m["sync/max_checksum_error"] == 0.0 and m["sync/mean_logprob_diff"] < 1e-4
        assert "actor/pg_loss" in m and m["agent/turns_mean"] >= 1
