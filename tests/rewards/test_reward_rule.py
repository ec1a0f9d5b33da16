"""exact and format rewards, called directly (no worker pool)."""

import pytest

from rewards import REWARDS

exact, fmt = REWARDS["exact"], REWARDS["format"]


def test_exact_whole_response_stripped():
    assert exact("p", "  42\n", {"answer": "42"}) == 1.0
    assert exact("p", "42", {"answer": 42}) == 1.0  # gold is compared as str
    assert exact("p", "The answer is 42", {"answer": "42"}) == 0.0
    assert exact("p", "x", {"gold": "x"}, answer_key="gold") == 1.0


def test_exact_pattern_uses_group_1_of_last_match():
    pattern = r"Answer:\s*(\S+)"
    assert exact("p", "Answer: 41\nno wait\nAnswer: 42", {"answer": "42"}, pattern=pattern) == 1.0
    assert exact("p", "Answer: 42\nno wait\nAnswer: 41", {"answer": "42"}, pattern=pattern) == 0.0
    # No match scores 0 even if the whole response equals the gold.
    assert exact("p", "42", {"answer": "42"}, pattern=pattern) == 0.0


def test_format_think_answer_tags():
    assert fmt("p", "<think>a\nb</think>\n<answer>42</answer>\n", {}) == 1.0
    assert fmt("p", "<think>a</think><answer>42</answer>", {}) == 1.0
    assert fmt("p", "<answer>42</answer>", {}) == 0.0  # no think block
    assert fmt("p", "<think>a</think> 42", {}) == 0.0  # no answer block
    assert fmt("p", "<think>a</think><answer>42</answer> trailing", {}) == 0.0
    assert fmt("p", "x <think>a</think><answer>42</answer>", {}) == 0.0


def test_format_custom_pattern_is_fullmatch_dotall():
    pattern = r"a reasoning</think>.*\\boxed\{.*\}"
    assert fmt("p", "a reasoning</think>\nso \\boxed{3}", {}, pattern=pattern) == 1.0
    assert fmt("p", "a reasoning</think>\nso \\boxed{3} more", {}, pattern=pattern) == 0.0  # fullmatch


contains, choice, length = REWARDS["contains"], REWARDS["choice"], REWARDS["length"]


def test_contains_substring_and_case():
    assert contains("p", "so it is Paris, France", {"answer": " Paris "}) == 1.0
    assert contains("p", "so it is paris", {"answer": "Paris"}) == 0.0
    assert contains("p", "so it is paris", {"answer": "Paris"}, ignore_case=True) == 1.0
    with pytest.raises(ValueError, match="row\\['answer'\\] is empty"):
        contains("p", "x", {"answer": "  "})


@pytest.mark.parametrize(("response", "expected"), [
    ("The answer is (B).", "B"),
    ("Answer: C", "C"),
    ("answer: **D**", "D"),
    ("First I thought the answer is A, but the answer is (B)", "B"),  # the last statement wins
    ("so \\boxed{C}", "C"),
    ("\\boxed{(D)} even though the answer is A", "D"),  # a boxed letter comes first
    ("\\boxed{\\text{E}}", "E"),
    (" (A) ", "A"),
    ("B.", "B"),
    ("the answer is a bit unclear", None),  # lower-case "a" is a word, not a choice
    ("I pick Z", None),
    ("", None),
])
def test_extract_choice(response, expected):
    from rewards.rule import extract_choice

    assert extract_choice(response) == expected


def test_choice_scores_and_checks_gold():
    assert choice("p", "The answer is (b)", {"answer": "B"}) == 0.0  # lower-case letters are not choices
    assert choice("p", "The answer is (B)", {"answer": "(b)"}) == 1.0  # gold is normalised
    assert choice("p", "Answer: K", {"answer": "K"}, letters="ABCDEFGHIJK") == 1.0
    with pytest.raises(ValueError, match="not one of the letters"):
        choice("p", "A", {"answer": "K"})


@pytest.mark.parametrize(("text", "expected"), [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last, nested braces balanced
    ("\\fbox{7}", "7"),
    ("\\boxed 5.", "5"),
    ("\\boxed{\\frac{1}{2}", None),  # never closed (truncated)
    ("no box", None),
])
def test_last_boxed(text, expected):
    from rewards.rule import last_boxed

    assert last_boxed(text) == expected


def test_length_soft_overlong_band_by_hand():
    # max 10, cache 4: no penalty up to 6 chars, then (6 - L) / 4 down to -1 at 10, -1 beyond.
    assert length("p", "x" * 6, {}, max_length=10, cache_length=4) == 0.0
    assert length("p", "x" * 7, {}, max_length=10, cache_length=4) == -0.25
    assert length("p", "x" * 10, {}, max_length=10, cache_length=4) == -1.0
    assert length("p", "x" * 11, {}, max_length=10, cache_length=4) == -1.0
    assert length("p", "a b c", {}, max_length=2, unit="words") == -1.0  # hard cut-off without a cache band
    assert length("p", "a b", {}, max_length=2, unit="words") == 0.0
    with pytest.raises(ValueError, match="unit="):
        length("p", "x", {}, max_length=2, unit="tokens")
    with pytest.raises(ValueError, match="cache_length <= max_length"):
        length("p", "x", {}, max_length=2, cache_length=3)
