"""math reward (Math-Verify), called directly in the main thread."""

import pytest

from rewards import REWARDS

math_reward = REWARDS["math"]


@pytest.mark.parametrize(
    ("gold", "response", "expected"),
    [
        ("\\frac{1}{2}", "\\boxed{0.5}", 1.0),
        ("42", "The answer is 42.", 1.0),
        ("42", "The answer is 41.", 0.0),
        ("2\\pi", "so the result is $\\boxed{2\\pi}$", 1.0),  # bare gold parsed plain would be 2
        ("2\\pi", "\\boxed{2}", 0.0),
        ("x=3", "\\boxed{3}", 1.0),
        ("$\\sqrt{2}$", "Final answer: \\boxed{\\sqrt{2}}", 1.0),
        ("5", "\\boxed{5} although 7 is tempting", 1.0),  # boxed has priority
        ("42", "no answer here", 0.0),
    ],
)
def test_math_cases(gold, response, expected):
    assert math_reward("p", response, {"answer": gold}) == expected


def test_math_passes_gold_first():
    # verify(gold, pred) is asymmetric: an interval gold does not accept an inequality
    # prediction, while an inequality gold accepts the interval.
    assert math_reward("p", "\\boxed{(1,2)}", {"answer": "1<x<2"}) == 1.0
    assert math_reward("p", "\\boxed{1<x<2}", {"answer": "(1,2)"}) == 0.0


def test_math_answer_key_and_numeric_gold():
    assert math_reward("p", "\\boxed{7}", {"solution": 7}, answer_key="solution") == 1.0


def test_math_unparseable_gold_raises_naming_it():
    with pytest.raises(ValueError, match=r"cannot parse gold answer '\\\\boxed\{\}'"):
        math_reward("p", "\\boxed{1}", {"answer": "\\boxed{}"})
