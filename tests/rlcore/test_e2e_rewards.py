"""End to end through the real CLI: the reward recipes (math + format, PRM dense for PPO and for GRPO
process supervision, code execution), each a few steps on CPU, with their metrics in TensorBoard."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_cli
from rewards import RewardResult
from rlcore.collect import _steps
from rlcore.models import char_tokenizer
from rollout import Sample

pytestmark = pytest.mark.slow

SHORT = ["model.warmstart.steps=0", "train.prompts_per_step=4", "rollout.samples_per_prompt=4",
         "data.task.num_train=200", "data.task.num_eval=8", "trainer.total_steps=3", "trainer.export=false",
         "trainer.save_every=0"]
STEP_KEYS = ("step_mean", "step_std", "steps_per_sample", "min_step_mean", "last_step_mean", "no_step_samples")


def scalars(run) -> set[str]:
    return set(EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload().Tags()["scalars"])


def last_metrics(run, key: str) -> dict:
    """The last metrics.jsonl record holding `key` (the final eval has a record of its own)."""
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in m][-1]


@pytest.mark.parametrize("recipe", ["ppo_prm_arith", "grpo_process_arith"])
def test_prm_recipes_log_step_level_rewards(tmp_path, recipe):
    run = tmp_path / "run"
    run_cli("train", recipe, *SHORT, f"trainer.output_dir={run}", cwd=tmp_path)
    tags = scalars(run)
    for key in STEP_KEYS:
        assert f"reward/prm/{key}" in tags, key
    m = last_metrics(run, "reward/prm/step_mean")
    assert 0.0 <= m["reward/prm/step_mean"] <= 1.0 and m["reward/prm/steps_per_sample"] > 0
    assert "reward/exact/mean" in tags and "actor/pg_loss" in tags
    if recipe == "ppo_prm_arith":
        assert "critic/value_loss" in tags or any(t.startswith("critic/") for t in tags)


def test_math_format_recipe_runs(tmp_path):
    run = tmp_path / "run"
    run_cli("train", "grpo_math_format_arith", *SHORT, f"trainer.output_dir={run}", cwd=tmp_path)
    tags = scalars(run)
    assert {"reward/math/mean", "reward/format/mean", "eval/accuracy"} <= tags


def test_step_ends_map_to_policy_tokens():
    # Char tokenizer: one token per char. "ab\n\ncd" has steps "ab\n\n" (ends after char 4 -> token 3)
    # and "cd" (token 5); the EOS token (id 1) decodes to nothing and ends no step.
    tok = char_tokenizer()
    ids = tok("ab\n\ncd")["input_ids"] + [tok.eos_token_id]
    result = RewardResult(scores=[0.0], components={}, metrics={}, step_scores=[[0.5, 0.25]], step_char_ends=[[4, 6]])
    steps = _steps(result, [Sample(token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop")], tok)
    assert steps == [([0.5, 0.25], [3, 5])]


def test_code_recipe_runs_programs_in_the_sandbox(tmp_path):
    run = tmp_path / "run"
    run_cli("train", "grpo_code_arith", *SHORT, f"trainer.output_dir={run}", cwd=tmp_path)
    tags = scalars(run)
    assert {"reward/code/mean", "reward/code/errors", "reward/code/timeouts", "eval/accuracy"} <= tags
    assert last_metrics(run, "reward/code/errors")["reward/code/errors"] == 0.0  # bad programs score 0, not errors
