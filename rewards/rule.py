"""String rule rewards: `exact`, `contains`, `choice` (multiple-choice letter), `format` (think/answer
tags or a regex) and `length` (soft over-length penalty); `last_boxed` extracts \\boxed{...} answers."""

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


@register("contains")
def contains_reward(
    prompt: str,
    response: str,
    row: Mapping[str, Any],
    *,
    answer_key: str = "answer",
    ignore_case: bool = False,
) -> float:
    """1.0 if str(row[answer_key]) (stripped, non-empty) occurs anywhere in the response, else 0.0."""
    gold = str(row[answer_key]).strip()
    if not gold:
        raise ValueError(f"contains: row[{answer_key!r}] is empty; every row needs a non-empty answer")
    if ignore_case:
        gold, response = gold.casefold(), response.casefold()
    return float(gold in response)


# "the answer is (B)", "Answer: B", "answer: **B**" — the last such statement wins. The letter must
# be upper case, so "the answer is a bit off" commits to nothing.
_CHOICE_STATEMENT = r"(?i:answer)\s*(?:is|:)?\s*[:\s]*[\(\[*]*\s*([{letters}])\b"


@register("choice")
def choice_reward(
    prompt: str,
    response: str,
    row: Mapping[str, Any],
    *,
    answer_key: str = "answer",
    letters: str = "ABCDEFGHIJ",
) -> float:
    """1.0 if the response's multiple-choice letter equals row[answer_key] (case-insensitive), else 0.0.

    The letter is, in order of preference: the content of the last \\boxed{...} if it is one of
    `letters` (optionally in parentheses); the last "answer is X" / "Answer: (X)" statement; a
    response that is a lone letter ("B", "(B)", "B."). Anything else scores 0.0.
    """
    gold = str(row[answer_key]).strip().strip("()").upper()
    if len(gold) != 1 or gold not in letters.upper():
        raise ValueError(f"choice: row[{answer_key!r}]={row[answer_key]!r} is not one of the letters {letters!r}")
    return float(extract_choice(response, letters) == gold)


def extract_choice(response: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """The multiple-choice letter the response commits to (upper case), or None (see choice_reward)."""
    letters = letters.upper()
    boxed = last_boxed(response)
    if boxed is not None:
        inner = boxed.strip().strip("()").replace("\\text{", "").rstrip("}").strip()
        if len(inner) == 1 and inner.upper() in letters:
            return inner.upper()
    matches = re.findall(_CHOICE_STATEMENT.format(letters=re.escape(letters)), response)
    if matches:
        return matches[-1].upper()
    lone = re.fullmatch(r"\s*\(?([A-Za-z])\)?\.?\s*", response)
    if lone and lone.group(1).upper() in letters:
        return lone.group(1).upper()
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with nested braces balanced; "\\boxed 5"
    (no braces) gives "5". None when there is none or its braces never close (a truncated answer).
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].removeprefix("\\boxed").removeprefix("\\fbox")
    if rest.startswith(" "):  # "\boxed 5": the answer is the next word
        word = rest.split(maxsplit=1)
        return word[0].rstrip(".$") if word else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return rest[1:i]
    return None


@register("length")
def length_reward(
    prompt: str,
    response: str,
    row: Mapping[str, Any],
    *,
    max_length: int,
    cache_length: int = 0,
    unit: str = "chars",
) -> float:
    """Soft over-length penalty (DAPO's shape, spec §3) on the response's length L in `unit`:

        0                          if L <= max_length − cache_length
        (max_length − cache_length − L) / cache_length   inside the cache band (0 down to −1)
        −1                         if L > max_length

    unit: "chars" or "words" (whitespace-separated). For the same penalty in policy tokens use
    algo.shaping.overlong_cache_tokens, which sees the token counts.
    """
    if unit not in ("chars", "words"):
        raise ValueError(f"length: unit={unit!r}; expected 'chars' or 'words'")
    if not 0 <= cache_length <= max_length or max_length <= 0:
        raise ValueError(f"length: need 0 <= cache_length <= max_length and max_length > 0, "
                         f"got max_length={max_length}, cache_length={cache_length}")
    n = len(response) if unit == "chars" else len(response.split())
    if n > max_length:
        return -1.0
    start = max_length - cache_length
    return 0.0 if n <= start else (start - n) / cache_length
