"""CompositeReward: weighted sums, metrics, errors and timeouts in worker processes."""

import threading
import time

import pytest

from rewards import CompositeReward, RewardResult

USER_CODE = """
import os, time

def flaky(prompt, response, row):
    if response == "hang":
        while True:
            time.sleep(1)
    if response == "boom":
        raise RuntimeError("boom")
    if response == "crash":
        os._exit(3)
    if response == "nan":
        return float("nan")
    return 0.25
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_reward.py"
    path.write_text(USER_CODE)
    return path


def test_weighted_sum_components_and_metrics():
    specs = [
        ("exact", 2.0, {}),
        ("format", 0.5, {}),
        ("exact", -1.0, {"pattern": r"<answer>(.*?)</answer>"}),  # same name twice -> exact_2
    ]
    responses = ["42", "<think>t</think><answer>42</answer>", "<think>t</think><answer>7</answer>"]
    rows = [{"answer": "42"}] * 3
    with CompositeReward(specs) as reward:
        result = reward(["p"] * 3, responses, rows)
    assert isinstance(result, RewardResult)
    assert result.components == {
        "exact": [1.0, 0.0, 0.0],
        "format": [0.0, 1.0, 1.0],
        "exact_2": [0.0, 1.0, 0.0],
    }
    # sample 0: 2*1 + 0.5*0 - 1*0 = 2.0; sample 1: 2*0 + 0.5*1 - 1*1 = -0.5; sample 2: 0.5*1 = 0.5
    assert result.scores == [2.0, -0.5, 0.5]
    assert result.metrics["reward/exact/mean"] == pytest.approx(1 / 3)
    assert result.metrics["reward/format/mean"] == pytest.approx(2 / 3)
    assert result.metrics["reward/exact_2/mean"] == pytest.approx(1 / 3)
    assert all(result.metrics[f"reward/{k}/{m}"] == 0.0 for k in result.components for m in ("errors", "timeouts"))
    assert len(result.metrics) == 9


def test_errors_and_timeouts_are_counted_and_pool_recovers(user_file):
    specs = [("exact", 1.0, {}), (f"python:{user_file}:flaky", 1.0, {})]
    responses = ["ok", "hang", "boom", "crash", "nan", "ok"]
    rows = [{"answer": "ok"}] * 5 + [{"answer": "ok", "bad": lambda: 0}]  # last row cannot be pickled
    with CompositeReward(specs, timeout_s=1.0, num_workers=2) as reward:
        start = time.monotonic()
        result = reward(["p"] * 6, responses, rows)
        assert time.monotonic() - start < 5.0  # the hung sample costs one timeout, not a hang
        assert result.components["user_reward.flaky"] == [0.25, 0.0, 0.0, 0.0, 0.0, 0.0]
        assert result.metrics["reward/user_reward.flaky/timeouts"] == 1.0
        assert result.metrics["reward/user_reward.flaky/errors"] == 4.0  # boom, crash, nan, unpicklable row
        assert result.components["exact"] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        assert result.metrics["reward/exact/errors"] == 1.0  # the unpicklable row
        assert result.scores[0] == 1.25

        # Killed and crashed workers were replaced: the next batch scores normally.
        result = reward(["p"] * 4, ["ok"] * 4, [{"answer": "ok"}] * 4)
        assert result.scores == [1.25] * 4
        assert result.metrics["reward/user_reward.flaky/timeouts"] == 0.0


def test_math_from_non_main_thread():
    # Math-Verify's own SIGALRM timeout would fail here; workers run it with timeouts off.
    out = {}
    rows = [{"answer": "\\frac{1}{2}"}, {"answer": "42"}, {"answer": "42"}, {"answer": "\\boxed{}"}]
    responses = ["\\boxed{0.5}", "The answer is 42.", "The answer is 41.", "\\boxed{1}"]

    def score():
        try:
            with CompositeReward([("math", 1.0, {})], timeout_s=30.0) as reward:
                out["result"] = reward(["p"] * 4, responses, rows)
        except BaseException as e:  # surface it in the main thread
            out["error"] = e

    thread = threading.Thread(target=score)
    thread.start()
    thread.join(timeout=60)
    assert "error" not in out, out.get("error")
    assert out["result"].components["math"] == [1.0, 1.0, 0.0, 0.0]
    assert out["result"].metrics["reward/math/errors"] == 1.0  # unparseable gold


def test_batch_of_128_exact_is_fast_once_warm():
    n = 128
    rows = [{"answer": str(i)} for i in range(n)]
    responses = [f"Answer: {i}" for i in range(n)]
    with CompositeReward([("exact", 1.0, {"pattern": r"Answer: (\d+)"})]) as reward:
        reward(["p"] * n, responses, rows)  # waits for the workers to start
        start = time.perf_counter()
        result = reward(["p"] * n, responses, rows)
        elapsed = time.perf_counter() - start
    assert result.scores == [1.0] * n
    assert elapsed < 0.5, f"128 exact samples took {elapsed:.3f} s"


def test_closed_composite_refuses_work_and_mismatched_lengths_raise():
    reward = CompositeReward([("exact", 1.0, {})])
    with pytest.raises(ValueError, match="2 prompts, 1 responses"):
        reward(["a", "b"], ["a"], [{"answer": "a"}])
    reward.close()
    reward.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        reward(["a"], ["a"], [{"answer": "a"}])


def test_math_timeout_is_honoured_from_a_worker_thread():
    # 9^(9^(9^9)) makes SymPy evaluate a number with ~10^(10^8) digits: it never finishes. Called from a
    # thread (where Math-Verify's SIGALRM timeouts cannot work), the pool's limit still stops it, the
    # sample scores 0 and is counted, and the next batch is scored normally.
    out = {}

    def score():
        try:
            with CompositeReward([("math", 1.0, {})], timeout_s=2.0, num_workers=1) as reward:
                reward(["p"], ["\\boxed{1}"], [{"answer": "1"}])  # wait for the worker to start
                start = time.perf_counter()
                out["hung"] = reward(["p", "p"], ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{2}"], [{"answer": "3"}, {"answer": "2"}])
                out["seconds"] = time.perf_counter() - start
                out["after"] = reward(["p"], ["\\boxed{1}"], [{"answer": "1"}])
        except BaseException as e:
            out["error"] = e

    thread = threading.Thread(target=score)
    thread.start()
    thread.join(timeout=120)
    assert "error" not in out, out.get("error")
    assert out["hung"].components["math"] == [0.0, 1.0]
    assert out["hung"].metrics["reward/math/timeouts"] == 1.0
    assert out["seconds"] < 2.0 + 30.0  # the limit plus a replacement worker's start on a loaded machine
    assert out["after"].scores == [1.0]


def test_model_terms_dense_prm_and_orm(tmp_path):
    # A prm term scores aggregate(step scores) like any reward; a dense one adds nothing to the score and
    # hands its weighted step scores on instead; an orm term scores in-process too.
    from rewards.orm import OutcomeRewardModel, build_tiny_orm
    from rewards.prm import ProcessRewardModel, build_tiny_prm
    from rlcore.models import char_tokenizer

    tok = char_tokenizer()
    for name, (model, model_tok) in {"prm": build_tiny_prm(tok, convention="qwen"), "orm": build_tiny_orm(tok)}.items():
        model.save_pretrained(tmp_path / name)
        model_tok.save_pretrained(tmp_path / name)
    prm, orm = str(tmp_path / "prm"), str(tmp_path / "orm")
    prompts, responses = ["1+1=", "2+2="], ["x\n\n2", "4"]
    rows = [{"answer": "2"}, {"answer": "5"}]
    steps = ProcessRewardModel(prm).score_steps(prompts, responses).scores
    orm_scores = OutcomeRewardModel(orm)(prompts, responses)
    specs = [("exact", 1.0, {"pattern": r"(\d)$"}), ("prm", 0.5, {"path": prm, "aggregate": "min"}),
             ("prm", 0.2, {"path": prm, "dense": True}), ("orm", 0.1, {"path": orm})]
    with CompositeReward(specs, num_workers=1) as reward:
        assert reward.is_dense
        result = reward(prompts, responses, rows)
    assert [len(s) for s in steps] == [2, 1]
    assert result.components["prm"] == [min(s) for s in steps]
    assert result.components["prm_2"] == [sum(s) / len(s) for s in steps]  # dense: logged as the mean step
    expected = [e + 0.5 * min(s) + 0.1 * o for e, s, o in zip([1.0, 0.0], steps, orm_scores)]
    assert result.scores == pytest.approx(expected, rel=1e-6)
    assert result.step_scores == [[0.2 * v for v in s] for s in steps]
    assert result.step_char_ends == [[3, 4], [1]]
    assert result.metrics["reward/prm_2/steps_per_sample"] == 1.5
    assert result.metrics["reward/prm_2/no_step_samples"] == 0.0


def test_model_terms_config_errors_name_the_term(tmp_path):
    with pytest.raises(ValueError, match=r"reward\[1\]: prm: args.path is required"):
        CompositeReward([("exact", 1.0, {}), ("prm", 1.0, {})])
    with pytest.raises(Exception, match=r"reward\[0\]"):
        CompositeReward([("orm", 1.0, {"path": str(tmp_path / "missing")})])


def test_submitted_batches_score_in_the_background_and_keep_their_own_results(user_file):
    """submit() returns before the workers are done; two batches in flight each get their own scores,
    and a batch's result() may be read twice."""
    slow = user_file.parent / "slow_reward.py"
    slow.write_text("import time\n\ndef score(prompt, response, row):\n    time.sleep(0.2)\n"
                    "    return float(response)\n")
    with CompositeReward([(f"python:{slow}:score", 2.0, {})], num_workers=2) as reward:
        reward(["p"], ["0"], [{}])  # worker start-up
        start = time.perf_counter()
        first = reward.submit(["p"] * 2, ["1", "2"], [{}] * 2)
        second = reward.submit(["p"] * 2, ["3", "4"], [{}] * 2)
        assert time.perf_counter() - start < 0.1
        assert second.result().scores == [6.0, 8.0] and first.result().scores == [2.0, 4.0]
        assert first.result() is first.result() and first.rule_seconds >= 0.2
