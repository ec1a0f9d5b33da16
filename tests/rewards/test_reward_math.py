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


# Equivalent and non-equivalent (gold, prediction) pairs; each prediction is tried in two realistic
# phrasings. The reference verdict is Math-Verify's own, with its default configuration, in the
# main thread (its SIGALRM timeouts on): our worker-safe configuration must not change a verdict.
EQUIVALENT = [("\\frac{1}{2}", "0.5"), ("\\frac{1}{2}", "\\dfrac{1}{2}"), ("2\\sqrt{2}", "\\sqrt{8}"),
              ("\\{1, 2\\}", "\\{2, 1\\}"), ("(x+1)^2", "x^2+2x+1"), ("3", "\\frac{6}{2}"), ("0.25", "\\frac14"),
              ("\\pi", "\\pi"), ("[1, 2)", "[1, 2)"), ("10", "10.0"), ("-3", "-3"), ("e^{2}", "e^2")]
DIFFERENT = [("\\frac{1}{2}", "0.6"), ("2\\sqrt{2}", "\\sqrt{6}"), ("\\{1, 2\\}", "\\{1, 3\\}"),
             ("(x+1)^2", "x^2+1"), ("3", "4"), ("\\pi", "3.14"), ("[1, 2)", "(1, 2)"), ("-3", "3"),
             ("e^{2}", "2e"), ("1/3", "0.33")]


@pytest.mark.parametrize(("gold", "pred", "equal"), [(g, p, True) for g, p in EQUIVALENT]
                         + [(g, p, False) for g, p in DIFFERENT])
def test_math_agrees_with_math_verify(gold, pred, equal):
    from math_verify import parse, verify

    for response in (f"The final answer is ${pred}$.", f"so \\boxed{{{pred}}}"):
        reference = verify(parse(f"${gold}$"), parse(response))
        assert reference == equal, "the pair list itself is wrong"
        assert math_reward("q", response, {"answer": gold}) == float(reference), response


def test_math_falls_back_to_the_last_plain_number():
    # "[5" is something Math-Verify extracts nothing from; the last plain number is 5.
    assert math_reward("p", "[5", {"answer": "5"}) == 1.0
    assert math_reward("p", "[5", {"answer": "6"}) == 0.0
    assert math_reward("p", "\\boxed{5", {"answer": "5"}) == 0.0  # a truncated box is no answer
    assert math_reward("p", "x = \\frac12", {"answer": "12"}) == 0.0  # digits of a command are no number
