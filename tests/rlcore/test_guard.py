"""What stops a run that would otherwise train on garbage: a reward term failing on every sample."""

import pytest

from rlcore.guard import RewardTermFailed, RewardTermWatch


def step_metrics(samples, errors, timeouts=0.0):
    return {"reward/samples": samples, "reward/exact/errors": 0.0, "reward/mine/errors": errors,
            "reward/mine/timeouts": timeouts}


def test_a_term_failing_on_every_sample_for_k_steps_stops_with_its_error():
    watch = RewardTermWatch(["exact", "mine"], max_steps=3)
    watch.observe(1, step_metrics(8, 8), {"mine": "KeyError: 'answr'"})
    watch.observe(2, step_metrics(8, 7), {"mine": "KeyError: 'answr'"})  # one sample scored: the count restarts
    watch.observe(3, step_metrics(8, 6, timeouts=2), {"mine": "timed out after 1.0 s"})  # timeouts are failures
    watch.observe(4, step_metrics(8, 8), {"mine": "KeyError: 'answr'"})
    with pytest.raises(RewardTermFailed, match=r"RL step 5: reward term 'mine' \(reward\.terms\[1\]\) failed on every "
                                               r"sample for 3 steps in a row.*KeyError: 'answr'.*reward\.max_failed_steps"):
        watch.observe(5, step_metrics(8, 8), {"mine": "KeyError: 'answr'"})


def test_zero_never_stops():
    watch = RewardTermWatch(["mine"], max_steps=0)
    for step in range(1, 10):
        watch.observe(step, step_metrics(4, 4), {"mine": "boom"})
