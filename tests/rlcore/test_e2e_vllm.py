"""rollout.engine=vllm end to end through the real CLI (vLLM's CPU build in CI's vLLM environment).

Each run checks the sync every step: per-tensor checksums of what the engine computes with, and the
engine's log-probs of what it sampled against the actor's (fp32 on both sides: equal to rounding).
Marked vllm: skipped in the main environment, which has no vLLM.
"""

import json

import pytest
from transformers import AutoModelForCausalLM

from conftest import run_cli

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VLLM = ["rollout.engine=vllm"]
# A few fast steps of the quickstart (head size 32, what vLLM's CPU attention supports).
SHORT = ["model.warmstart.steps=0", "train.prompts_per_step=8", "rollout.samples_per_prompt=4",
         "rollout.max_new_tokens=6", "data.task.num_train=200", "data.task.num_eval=16"]


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def steps(run):
    return [m for m in read_metrics(run) if "reward/mean" in m]


def assert_synced(run, num_tensors=None):
    for m in steps(run):
        assert m["sync/max_checksum_error"] < 1e-6 and m["sync/mean_logprob_diff"] < 1e-4, m
        if num_tensors is not None:
            assert m["sync/checksummed_tensors"] == num_tensors


def test_quickstart_with_vllm_syncs_resumes_exactly_and_exports(tmp_path):
    """Every tensor checked (26 sent + the tied head under its own name); a run resumed from a checkpoint
    samples and trains exactly as the straight run (requests are seeded from the checkpointed RNG)."""
    args = [*VLLM, *SHORT, "trainer.save_every=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli("train", *args, "trainer.total_steps=3", f"trainer.output_dir={straight}", cwd=tmp_path)
    run_cli("train", *args, "trainer.total_steps=2", "trainer.export=false", f"trainer.output_dir={resumed}",
            cwd=tmp_path)
    proc = run_cli("train", *args, "trainer.total_steps=3", f"trainer.output_dir={resumed}", cwd=tmp_path)
    assert "resumed from" in proc.stderr
    assert_synced(straight, num_tensors=27)
    a, b = steps(straight), steps(resumed)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    for key in ("reward/mean", "response/length_mean", "actor/pg_loss", "actor/grad_norm"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], abs=1e-6), key
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["export_max_logit_diff"] <= 1e-5 and "eval_after" in summary
    AutoModelForCausalLM.from_pretrained(straight / "hf")


def test_ppo_with_critic_through_vllm(tmp_path):
    run = tmp_path / "run"
    run_cli("train", "ppo_arith", *VLLM, *SHORT, "trainer.total_steps=2", "trainer.export=false",
            f"trainer.output_dir={run}", cwd=tmp_path)
    assert_synced(run)
    assert all("critic/value_loss" in m and "critic/explained_variance" in m for m in steps(run))


def test_lora_merged_weights_sync_into_vllm(tmp_path):
    run = tmp_path / "run"
    run_cli("train", "grpo_lora_arith", *VLLM, *SHORT, "trainer.total_steps=2", f"trainer.output_dir={run}",
            cwd=tmp_path)
    assert_synced(run, num_tensors=27)  # merged W + (alpha/r) B A, checked through vLLM's layers
    assert json.loads((run / "summary.json").read_text())["export_max_logit_diff"] < 1e-3


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_recipe_through_vllm(tmp_path, family):
    """MoE through vLLM's CPU build: experts sent per expert, repacked by the engine after each sync
    (vLLM skips that on updates), so the engine's log-probs equal the actor's. Routing replay needs
    vLLM's routed-experts return, which its CPU build lacks: refused before any model loads."""
    run = tmp_path / "run"
    proc = run_cli("train", f"gspo_{family}_arith", *VLLM, *SHORT, "algo.routing_replay=true",
                   f"trainer.output_dir={run}", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "routing_replay" in proc.stderr and "CPU build" in proc.stderr
    run_cli("train", f"gspo_{family}_arith", *VLLM, *SHORT, "trainer.total_steps=2", "trainer.export=false",
            f"trainer.output_dir={run}", cwd=tmp_path)
    assert_synced(run)
    assert all("moe/max_load_ratio" in m for m in steps(run))


def test_tools_through_vllm_score_each_turn_as_the_actor_does(tmp_path):
    """Multi-turn rollouts with the calculator through vLLM: every turn's continuation (prompt, earlier
    turns, tool turns) is a new request with its own budget; the engine's log-probs of the model's
    tokens equal the actor's one forward over the whole trajectory."""
    run = tmp_path / "run"
    short = [a for a in SHORT if not a.startswith("rollout.max_new_tokens=")]
    run_cli("train", *VLLM, *short, "rollout.max_new_tokens=110", "data.apply_chat_template=true",
            "data.max_prompt_tokens=64", "data.task.num_digits=1", "data.task.answer_format=tool_calculator",
            "model.warmstart.steps=150", "model.warmstart.batch_size=32", "model.warmstart.lr=3e-3",
            "model.warmstart.target_key=target", "rollout.max_turns=3", "rollout.tools=[{name: calculator}]",
            "trainer.total_steps=2", "trainer.export=false", f"trainer.output_dir={run}", cwd=tmp_path)
    assert_synced(run)
    assert sum(m["agent/tool_calls"] for m in steps(run)) > 0


def test_two_ranks_each_with_its_own_engine(tmp_path):
    run = tmp_path / "run"
    run_cli("train", *VLLM, *SHORT, "trainer.nproc=2", "trainer.total_steps=2", f"trainer.output_dir={run}",
            cwd=tmp_path)
    assert_synced(run, num_tensors=27)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["export_max_logit_diff"] <= 1e-5
