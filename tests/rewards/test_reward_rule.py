"""exact and format rewards, called directly (no worker pool)."""

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
