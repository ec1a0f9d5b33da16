"""End to end through the real CLI: a short GRPO run, SIGKILL + resume, a local model on a jsonl."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, run_cli, write_jsonl
from rlcore.models import char_tokenizer

pytestmark = pytest.mark.slow

# A few fast steps of the quickstart: no warm start, short answers.
SHORT = ["model.warmstart.steps=0", "train.prompts_per_step=8", "rollout.samples_per_prompt=4",
         "rollout.max_new_tokens=6", "data.task.num_train=200", "data.task.num_eval=16", "trainer.sample_text_every=2"]


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_short_run_writes_tensorboard_metrics_and_a_loadable_export(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", *SHORT, "trainer.total_steps=4", "trainer.save_every=2", f"trainer.output_dir={run}",
                   cwd=tmp_path)
    assert "held-out accuracy" in proc.stdout
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    for key in ("reward/mean", "reward/exact/mean", "response/length_mean", "actor/pg_loss", "actor/entropy",
                "actor/grad_norm", "timing/generate", "timing/update", "perf/tokens_per_s", "eval/accuracy",
                "sync/mean_logprob_diff"):
        assert key in scalars, key
    assert any("samples" in t for t in acc.Tags()["tensors"])  # sample text
    assert [m["step"] for m in read_metrics(run) if "reward/mean" in m] == [1, 2, 3, 4]
    assert (run / "config.yaml").read_text().startswith("model:")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["export_max_logit_diff"] <= 1e-5
    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    tok = AutoTokenizer.from_pretrained(run / "hf")
    out = model.generate(**tok("12+34=", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len("12+34=")
    trained = char_tokenizer()  # the export tokenizes as training did, whitespace included
    for text in ("1 + 2 =", "a b\nc", "12+34="):
        assert tok(text)["input_ids"] == trained(text)["input_ids"] and tok.decode(tok(text)["input_ids"]) == text
    # rlcore export of a checkpoint gives the same weights as the run's export
    run_cli("export", str(run), str(tmp_path / "exported"), cwd=tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_sigkill_then_resume_continues_without_repeating_or_skipping_data(tmp_path):
    args = [*SHORT, "trainer.total_steps=8", "trainer.save_every=2", "trainer.export=false"]
    straight = tmp_path / "straight"
    run_cli("train", *args, f"trainer.output_dir={straight}", cwd=tmp_path)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "rlcore", "train", *args, f"trainer.output_dir={killed}"],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once a checkpoint exists and more steps were logged after it
        metrics = killed / "metrics.jsonl"
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []
        if (killed / "checkpoints" / "step_000004").exists() and max(steps, default=0) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    proc = run_cli("train", *args, f"trainer.output_dir={killed}", "trainer.resume=auto", cwd=tmp_path)
    assert "resumed from" in proc.stderr

    def batches(run):
        return [(m["step"], m["prompt_indices"]) for m in read_metrics(run) if "prompt_indices" in m]

    assert batches(killed) == batches(straight)  # every step once, same prompts, same order
    # Same RNG, data and optimizer state: the resumed trajectory is the uninterrupted one.
    rewards = [[m["reward/mean"] for m in read_metrics(r) if "reward/mean" in m] for r in (killed, straight)]
    assert rewards[0] == pytest.approx(rewards[1], abs=1e-6)


def test_local_model_and_jsonl(tmp_path, saved_model):
    """The grpo_math_jsonl recipe on a locally saved Qwen2 and Llama model and a jsonl (KL loss on)."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": f"{a}+{a}=", "answer": str(2 * a)} for a in range(40)])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"question": f"{a}+1=", "answer": str(a + 1)} for a in range(8)])
    for family in ("qwen2", "llama"):
        run = tmp_path / f"run-{family}"
        proc = run_cli("train", "grpo_math_jsonl", f"model.path={saved_model(family)}", "model.dtype=float32",
                       f"data.train_files=[{train}]", f"data.eval_files=[{evals}]", "train.prompts_per_step=4",
                       "train.minibatches_per_step=2", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=8",
                       "train.max_tokens_per_microbatch=600", "trainer.total_steps=2", f"trainer.output_dir={run}",
                       cwd=tmp_path)
        assert "held-out accuracy" in proc.stdout
        metrics = read_metrics(run)
        assert any("actor/kl" in m for m in metrics) and any("reward/math/mean" in m for m in metrics)
        assert AutoModelForCausalLM.from_pretrained(run / "hf").config.model_type == family


def test_resume_never_refuses_a_folder_with_checkpoints(tmp_path):
    run = tmp_path / "run"
    run_cli("train", *SHORT, "trainer.total_steps=2", "trainer.export=false", f"trainer.output_dir={run}", cwd=tmp_path)
    proc = run_cli("train", *SHORT, "trainer.resume=never", f"trainer.output_dir={run}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "trainer.resume=auto" in proc.stderr


def test_missing_reward_file_and_bad_dataset_fail_before_training(tmp_path):
    proc = run_cli("train", "reward.terms=[{name: 'python:rewards_of_mine.py:score'}]", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "rewards_of_mine.py" in proc.stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"text": "x", "answer": "y"}])
    proc = run_cli("train", f"data.train_files=[{bad}]", "trainer.output_dir=r", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "bad.jsonl" in proc.stderr and "row 2" in proc.stderr and "'prompt'" in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_dapo_knobs_through_the_cli_with_constant_rewards(tmp_path):
    """Every group constant: dynamic sampling hits its bound, warns, trains on; TIS on (overlong shaping
    would make the rewards differ by length, so it is tested in test_collect.py)."""
    (tmp_path / "const.py").write_text("def one(prompt, response, row):\n    return 1.0\n")
    run = tmp_path / "run"
    proc = run_cli("train", *SHORT, "trainer.total_steps=2", "trainer.export=false", f"trainer.output_dir={run}",
                   "reward.terms=[{name: 'python:const.py:one'}]", "algo.filter.drop_constant_groups=true",
                   "algo.filter.max_rounds=2",
                   "algo.rollout_correction.level=token", "algo.policy_loss.clip_high=0.28", cwd=tmp_path)
    assert "dynamic sampling kept 0 of 8 groups after 2 rounds" in proc.stderr
    steps = [m for m in read_metrics(run) if "reward/mean" in m]
    assert [m["filter/rounds"] for m in steps] == [2.0, 2.0] and all(m["filter/hit_max_rounds"] == 1.0 for m in steps)
    assert all(len(m["prompt_indices"]) == 16 for m in steps)  # two rounds of 8 prompts drawn per step
    assert all("rollout_corr/is_weight_mean" in m for m in steps)
    assert all(m["actor/pg_loss"] == 0.0 for m in steps)  # constant rewards: zero advantages, zero loss


def test_ppo_with_critic_and_kl_in_reward_resumes_exactly(tmp_path, saved_model):
    """PPO: critic metrics logged, the value model checkpointed, and a resumed run equals a straight one.
    The straight run scores its rewards during the critic and reference passes, the resumed one before
    them: the same numbers."""
    args = ["ppo_arith", *SHORT, "trainer.save_every=1", "trainer.export=false", "algo.kl.coef=0.01",
            "algo.kl.placement=reward", "algo.kl.estimator=k1", "algo.kl.target=0.001"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli("train", *args, "reward.overlap=true", "trainer.total_steps=3", f"trainer.output_dir={straight}",
            cwd=tmp_path)
    run_cli("train", *args, "reward.overlap=false", "trainer.total_steps=2", f"trainer.output_dir={resumed}",
            cwd=tmp_path)
    assert (resumed / "checkpoints" / "step_000002" / "critic" / "config.json").exists()
    proc = run_cli("train", *args, "reward.overlap=false", "trainer.total_steps=3", f"trainer.output_dir={resumed}",
                   cwd=tmp_path)
    assert "resumed from" in proc.stderr
    a, b = ([m for m in read_metrics(r) if "critic/value_loss" in m] for r in (straight, resumed))
    assert len(a) == len(b) == 3
    assert len({m["actor/kl_coef"] for m in a}) == 3  # the adaptive controller moved the coefficient each step
    for key in ("critic/value_loss", "critic/value_mean", "actor/pg_loss", "reward/mean", "actor/kl_coef"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], abs=1e-6), key


def test_vapo_pretrains_the_critic_then_trains_both(tmp_path):
    run = tmp_path / "run"
    run_cli("train", "vapo_arith", *SHORT, "critic.pretrain_steps=2", "trainer.total_steps=4",
            "trainer.export=false", f"trainer.output_dir={run}", cwd=tmp_path)
    steps = [m for m in read_metrics(run) if "critic/value_loss" in m]
    assert ["actor/pg_loss" in m for m in steps] == [False, False, True, True]  # policy frozen for 2 steps
    assert all("actor/positive_nll" in m for m in steps[2:])
