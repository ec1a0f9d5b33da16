"""Steps 1-4 with a fake engine: dynamic sampling (DAPO), overlong shaping, rewards scored while the
caller goes on."""

import time

import pytest

from rewards import CompositeReward
from rlcore.collect import collect
from rlcore.config import RLConfig
from rlcore.data import PromptSampler, tokenize_prompts
from rlcore.metrics import Timer
from rlcore.models import char_tokenizer
from rollout import Sample, SamplingParams

TOK = char_tokenizer()


class FakeEngine:
    """Answers prompt i with the character script[i][k] for sample k (then EOS)."""

    def __init__(self, script):
        self.script, self.calls = script, 0

    def generate(self, prompts, sampling):
        self.calls += 1
        out = []
        for p in prompts:
            key = TOK.decode(p)
            out.append([Sample(TOK(c)["input_ids"] + [TOK.eos_token_id], [-0.5, -0.5], "stop")
                        for c in self.script[key][: sampling.n]])
        return out


def setup(script, answers, **algo):
    cfg = RLConfig()
    cfg.train.prompts_per_step, cfg.rollout.samples_per_prompt, cfg.rollout.max_new_tokens = 2, 2, 4
    for key, value in algo.items():
        section, name = key.split("__")
        setattr(getattr(cfg.algo, section), name, value)
    rows = [{"prompt": p, "answer": a} for p, a in answers.items()]
    prompts = tokenize_prompts(rows, TOK, cfg.data, "test")
    return cfg, prompts, FakeEngine(script)


def start(cfg, prompts, engine, reward, timer=None, overlap=True):
    return collect(cfg=cfg, sampler=PromptSampler(len(prompts), seed=0), prompts=prompts, engine=engine,
                   sampling=SamplingParams(n=2, max_new_tokens=4), tokenizer=TOK, reward_fn=reward,
                   timer=timer or Timer(), overlap=overlap)


def run(cfg, prompts, engine, reward):
    return start(cfg, prompts, engine, reward).result()


@pytest.fixture(scope="module")
def exact():
    with CompositeReward([("exact", 1.0, {})], num_workers=1) as r:
        yield r


def test_dynamic_sampling_keeps_only_groups_with_signal(exact):
    # a? and b? always right or always wrong (constant groups); c? and d? half right.
    script = {"a?": "11", "b?": "99", "c?": "19", "d?": "91"}
    cfg, prompts, engine = setup(script, {"a?": "1", "b?": "1", "c?": "1", "d?": "1"},
                                 filter__drop_constant_groups=True, filter__max_rounds=5)
    out = run(cfg, prompts, engine, exact)
    kept = {TOK.decode(p) for p in out.batch.prompt_ids}
    assert kept == {"c?", "d?"} and len(out.batch) == 4 and out.batch.group_ids.tolist() == [0, 0, 1, 1]
    assert out.metrics["filter/hit_max_rounds"] == 0.0 and out.metrics["filter/rounds"] == engine.calls
    assert out.metrics["filter/dropped_frac"] == pytest.approx(
        sum(TOK.decode(prompts.token_ids[i]) in ("a?", "b?") for i in out.prompt_indices) / len(out.prompt_indices))
    assert sorted(out.scores.view(2, 2).sum(1).tolist()) == [1.0, 1.0]  # one right of two in each kept group


def test_constant_rewards_hit_the_round_bound_warn_and_train_on(exact, capsys):
    script = {"a?": "11", "b?": "99"}
    cfg, prompts, engine = setup(script, {"a?": "1", "b?": "1"}, filter__drop_constant_groups=True,
                                 filter__max_rounds=3)
    out = run(cfg, prompts, engine, exact)
    assert engine.calls == 3 and out.metrics["filter/rounds"] == 3.0 and out.metrics["filter/hit_max_rounds"] == 1.0
    assert out.metrics["filter/dropped_frac"] == 1.0
    assert "dynamic sampling kept 0 of 2 groups after 3 rounds" in capsys.readouterr().err
    assert len(out.batch) == 4  # trains on the last round; its advantages are all zero


def test_without_filter_one_round_and_reward_metrics(exact):
    script = {"a?": "11", "b?": "19"}
    cfg, prompts, engine = setup(script, {"a?": "1", "b?": "1"})
    out = run(cfg, prompts, engine, exact)
    assert engine.calls == 1 and len(out.batch) == 4 and "filter/rounds" not in out.metrics
    assert out.metrics["reward/mean"] == 0.75 and out.metrics["reward/accuracy"] == 0.75
    assert out.metrics["reward/exact/mean"] == 0.75


def test_overlong_penalty_is_added_to_the_reward(exact):
    # Responses are 2 tokens (answer + EOS); max_new_tokens 4, cache 3: penalty = ((4-3) - 2)/3 = -1/3.
    script = {"a?": "11", "b?": "19"}
    cfg, prompts, engine = setup(script, {"a?": "1", "b?": "1"}, shaping__overlong_cache_tokens=3)
    out = run(cfg, prompts, engine, exact)
    expected = []
    for g in range(2):
        key = TOK.decode(out.batch.prompt_ids[2 * g])
        expected += [(c == "1") - 1 / 3 for c in script[key]]
    assert out.scores.tolist() == pytest.approx(expected)
    assert out.metrics["reward/overlong/mean"] == pytest.approx(-1 / 3)
    assert out.metrics["reward/accuracy"] == 0.75  # the first term, not the shaping


@pytest.mark.parametrize("overlap", [True, False])
def test_without_filter_the_batch_comes_back_before_its_rewards(tmp_path, overlap):
    """With overlap the rule rewards run in the workers after collect() returns: a reward that sleeps
    0.3 s per sample (4 samples, 2 workers: >= 0.6 s) leaves collect() fast, and work done meanwhile
    hides it. Without, collect() waits for them."""
    slow = tmp_path / "slow.py"
    slow.write_text("import time\n\ndef reward(prompt, response, row):\n    time.sleep(0.3)\n"
                    "    return float(response == row['answer'])\n")
    script = {"a?": "11", "b?": "19"}
    cfg, prompts, engine = setup(script, {"a?": "1", "b?": "1"})
    with CompositeReward([(f"python:{slow}:reward", 1.0, {})], num_workers=2) as reward:
        reward(["p"], ["1"], [{"answer": "1"}])  # the workers' start-up, outside the timing
        timer = Timer()
        begin = time.perf_counter()
        collecting = start(cfg, prompts, engine, reward, timer, overlap=overlap)
        returned = time.perf_counter() - begin
        time.sleep(0.7)  # the trainer's model passes
        out = collecting.result()
        waited = timer.pop()["timing/reward"]
    if overlap:
        assert returned < 0.3 and waited < 0.3
    else:
        assert returned >= 0.6 and waited >= 0.6
    assert out.metrics["perf/reward_seconds"] >= 0.6
    assert len(out.batch) == 4 and collecting.batch is out.batch
    assert out.metrics["reward/mean"] == 0.75 and collecting.result() is out


def test_reward_overlap_unset_means_spare_cores(monkeypatch):
    from rlcore.config import RewardConfig
    from rlcore.trainer import overlap_rewards

    monkeypatch.setattr("os.cpu_count", lambda: 4)
    monkeypatch.setattr("torch.get_num_threads", lambda: 2)
    assert overlap_rewards(RewardConfig(num_workers=2), "cpu") is True
    assert overlap_rewards(RewardConfig(num_workers=3), "cpu") is False
    assert overlap_rewards(RewardConfig(num_workers=3), "cuda") is True
    assert overlap_rewards(RewardConfig(num_workers=2, overlap=False), "cuda") is False
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this host: 2 x (2 + 2) > 4
    assert overlap_rewards(RewardConfig(num_workers=2), "cpu") is False
