"""String rule rewards: `exact` answer match and `format` (think/answer tags)."""

import re
from collections.abc import Mapping
from typing import Any

from rewards.registry import register

# R1-Zero template: "<think> reasoning </think> <answer> answer </answer>".
THINK_ANSWER_PATTERN = r"^<think>.*?</think>\s*<answer>.*?</answer>\s*$"


@register("exact")
def exact_reward(
    prompt: str,
    response: str,
    row: Mapping[str, Any],
    *,
    answer_key: str = "answer",
    pattern: str | None = None,
) -> float:
    """1.0 if the answer equals str(row[answer_key]) after stripping both, else 0.0.

    The answer is the whole response, or with `pattern` group 1 of its last match
    (re.finditer, no flags; embed `(?s)` etc. in the pattern); no match scores 0.0.
    """
    answer = response
    if pattern is not None:
        last = None
        for last in re.finditer(pattern, response):
            pass
        if last is None:
            return 0.0
        answer = last.group(1) or ""
    return float(answer.strip() == str(row[answer_key]).strip())


@register("format")
def format_reward(
    prompt: str,
    response: str,
    row: Mapping[str, Any],
    *,
    pattern: str | None = None,
) -> float:
    """1.0 if the response is `<think>...</think> <answer>...</answer>`, else 0.0.

    `pattern` replaces that check with re.fullmatch(pattern, response, re.DOTALL).
    Note: if the prompt already ends with "<think>", the response lacks it; pass a pattern.
    """
    if pattern is None:
        return float(re.match(THINK_ANSWER_PATTERN, response, re.DOTALL) is not None)
    return float(re.fullmatch(pattern, response, re.DOTALL) is not None)
