"""The RL step in process: the on-policy fast path skips the old-log-prob forward and still checks the
engine's weights; a corrupted engine stops the run either way."""

import pytest
import torch

import rlcore.lora
import rlcore.sync
from conftest import REPO
from rlcore.config import freeze
from rlcore.recipe import compose
from rlcore.trainer import Trainer
from rlcore.validate import validate

SMALL = ["model.warmstart.steps=0", "train.prompts_per_step=4", "rollout.samples_per_prompt=4",
         "rollout.max_new_tokens=6", "data.task.num_train=64", "data.task.num_eval=8", "trainer.eval_every=0"]


def make_trainer(tmp_path, *overrides):
    cfg, _ = compose("quickstart", [*SMALL, *overrides])
    plan = validate(cfg)
    freeze(cfg)
    return Trainer(cfg, plan, tmp_path)


@pytest.mark.parametrize("minibatches, expect_forward", [(1, False), (2, True)])
def test_old_logprob_forward_only_when_not_on_policy(tmp_path, monkeypatch, minibatches, expect_forward):
    trainer = make_trainer(tmp_path, f"train.minibatches_per_step={minibatches}")
    calls = []
    original = trainer.actor.logprobs
    monkeypatch.setattr(trainer.actor, "logprobs", lambda *a, **k: calls.append(1) or original(*a, **k))
    try:
        metrics = trainer.rl_step()
    finally:
        trainer.close()
    assert bool(calls) == expect_forward
    assert metrics["sync/mean_logprob_diff"] < 1e-4  # the check ran, on whichever log-probs were the old ones
    assert "actor/pg_loss" in metrics


@pytest.mark.parametrize("minibatches", [1, 2])
def test_corrupted_engine_weights_stop_the_step(tmp_path, monkeypatch, minibatches):
    trainer = make_trainer(tmp_path, f"train.minibatches_per_step={minibatches}")
    sync = trainer.engine.load_weights

    def corrupt_after_sync(named):
        sync(named)
        with torch.no_grad():
            trainer.engine.model.model.layers[0].mlp.down_proj.weight.mul_(3.0)

    monkeypatch.setattr(trainer.engine, "load_weights", corrupt_after_sync)
    try:
        with pytest.raises(RuntimeError, match="tensor 'model.layers.0.mlp.down_proj.weight' in the rollout engine"):
            trainer.rl_step()
    finally:
        trainer.close()


def test_logprob_check_catches_what_checksums_cannot_see(tmp_path, monkeypatch):
    """An engine whose checksums look right but samples from other weights (e.g. a stale copy behind
    a correct one) is caught by the second check: its log-probs against the actor's."""
    trainer = make_trainer(tmp_path)
    monkeypatch.setattr(trainer.engine, "weight_checksums", lambda names: trainer._sent_checksums)
    sync = trainer.engine.load_weights

    def corrupt_after_sync(named):
        sync(named)
        with torch.no_grad():
            trainer.engine.model.model.layers[0].mlp.down_proj.weight.mul_(3.0)

    real_stream = rlcore.sync.stream_weights

    def keep_checksums(model, bucket_mb, stats):
        yield from real_stream(model, bucket_mb, stats)
        trainer._sent_checksums = dict(stats["checksums"])

    monkeypatch.setattr(rlcore.sync, "stream_weights", keep_checksums)
    monkeypatch.setattr(trainer.engine, "load_weights", corrupt_after_sync)
    try:
        with pytest.raises(RuntimeError, match="log-probs differ from the actor's"):
            trainer.rl_step()
    finally:
        trainer.close()


def test_sync_holds_at_most_one_bucket_of_full_tensors(tmp_path):
    trainer = make_trainer(tmp_path, "rollout.sync_bucket_mb=1")
    try:
        stats = {"bytes": 0, "buckets": 0, "checksums": {}, "aliases": {}}
        sizes = [p.numel() * p.element_size() for p in trainer.actor.model.parameters()]
        names = [name for name, _ in rlcore.sync.stream_weights(trainer.actor.model, 1, stats)]
    finally:
        trainer.close()
    assert stats["buckets"] >= 2 and stats["max_bucket_bytes"] <= max(2**20, max(sizes))
    assert stats["bytes"] == sum(sizes)  # every parameter once (the tied embedding once)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


def test_lora_actor_syncs_merged_weights_into_the_engine(tmp_path):
    trainer = make_trainer(tmp_path, "model.lora.rank=4", "algo.kl.coef=0.01")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero adapters, so merged != base
        for name, p in trainer.actor.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    try:
        metrics = trainer.rl_step()
        merged = dict(rlcore.lora.merged_state(trainer.actor.model))
        engine = trainer.engine.model.state_dict()
    finally:
        trainer.close()
    assert trainer.ref is None  # the reference is the actor with adapters off, not a copy
    assert metrics["sync/max_checksum_error"] == 0.0 and metrics["sync/mean_logprob_diff"] < 1e-4
    assert "actor/kl" in metrics
    # the engine holds the merged weights the actor had when it synced (before this step's update)
    assert set(merged) <= set(engine)


def test_timer_records_peak_memory_per_phase():
    """In a fresh process: in a long-lived one (pytest) a new tensor may reuse freed resident pages
    and leave the resident-set high-water mark where it was."""
    import json
    import subprocess
    import sys

    code = """
import json, torch
from rlcore.metrics import Timer
timer = Timer("cpu")
with timer("small"):
    torch.zeros(1000).sum()
with timer("big"):
    x = torch.ones(256 * 2**20 // 4)  # 256 MiB touched
    x.sum()
    del x
print(json.dumps(timer.pop()))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    cwd=str(REPO)).stdout)
    assert set(out) >= {"timing/small", "timing/big"}
    if "perf/peak_mem_big" in out:  # Linux: the resident-set high-water mark of the phase
        assert out["perf/peak_mem_big"] >= out["perf/peak_mem_small"] + 0.2


def test_ppo_step_with_tools_trains_and_values_only_the_models_tokens(tmp_path):
    """PPO (critic, KL in the reward) on trajectories with tool turns: old / reference log-probs and
    advantages exist on the model's tokens only, the sequences keep the tool tokens (lengths)."""
    import json
    import re

    from rollout import Sample
    from rollout.base import cut_to_budget

    trainer = make_trainer(tmp_path, "critic.enabled=true", "algo.kl.coef=0.01", "algo.kl.placement=reward",
                           "data.apply_chat_template=true", "data.max_prompt_tokens=64", "rollout.max_new_tokens=110",
                           "data.task.answer_format=tool_calculator", "rollout.max_turns=3",
                           "rollout.tools=[{name: calculator}]", "rollout.verify_sync=false")
    tok = trainer.tokenizer

    class Scripted:  # calls the calculator on the prompt's problem, then answers what it read (or 0)
        def generate(self, prompts, sampling, max_new_tokens=None):
            out = []
            for i, p in enumerate(prompts):
                text = tok.decode(p)
                read = re.findall(r"\ntool: (.*)\n", text)
                reply = ("<tool_call>" + json.dumps({"name": "calculator", "arguments": {
                    "expression": re.search(r"user: (.*)=", text).group(1)}}) + "</tool_call>") if not read else read[0]
                group = []
                for k in range(sampling.n):  # answers: every other trajectory (one prompt each by then) wrong
                    ids = tok(reply if i % 2 == 0 or not read else "0")["input_ids"] + [tok.eos_token_id]
                    budget = max_new_tokens[i] if max_new_tokens else sampling.max_new_tokens
                    group.append(cut_to_budget(Sample(ids, [-0.5] * len(ids), "stop"), budget, len(p)))
                out.append(group)
            return out

        def wake(self):
            pass

        def sleep(self):
            pass

    trainer.rollout_engine.engine = Scripted()
    seen = {}
    update = trainer.actor.update
    trainer.actor.update = lambda batch: seen.setdefault("batch", batch) and update(batch)
    try:
        metrics = trainer.rl_step()
    finally:
        trainer.close()
    b = seen["batch"]
    real = torch.arange(b.mask.shape[1]) < b.lengths[:, None]
    tool = real & (b.mask == 0)
    assert tool.any() and (b.lengths > b.mask.sum(-1)).all()  # every sample called the tool
    for name in ("advantages", "old_logprobs", "ref_logprobs"):
        values = getattr(b, name)
        assert (values[tool] == 0).all() and (values[b.mask.bool()] != 0).any(), name
    assert metrics["agent/tool_calls"] == len(b) and metrics["agent/tool_errors"] == 0
    assert metrics["reward/mean"] == 0.5 and "critic/value_loss" in metrics and "actor/kl_in_reward" in metrics
