"""`math` reward: symbolic answer check with Math-Verify (spec §7).

Math-Verify's own timeouts use SIGALRM, which works only in the main thread, so they are
disabled here (parsing_timeout=None, timeout_seconds=None); the worker pool in
`rewards.pool` enforces a wall-clock limit instead. Math-Verify (and SymPy) import lazily,
~1 s, so `import rewards` stays cheap; workers call `math_reward.warmup` at start.
"""

import functools
import logging
import re
from collections.abc import Mapping
from typing import Any

from rewards.registry import register
from rewards.rule import last_boxed

# Delimiters that make a gold string "not bare": Math-Verify finds LaTeX only inside them.
_MATH_DELIMITERS = ("$", "\\boxed", "\\(", "\\[")


@functools.cache
def _math_verify() -> tuple[Any, Any, list]:
    """(parse, verify, prediction extraction config), imported on first use."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.parser import NormalizationConfig

    # It warns once that timeouts are off; that is deliberate here (see module docstring).
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # Spec §7 reward config: boxed answers first, LaTeX only with an anchor ("answer is",
    # \boxed, ...); ExprExtractionConfig adds plain numbers ("the answer is 42"). One deviation:
    # malformed_operators=True, so the common shorthand "\frac14" reads as 1/4 (Math-Verify's own
    # default; with False it scored 0 against a gold of 0.25, disagreeing with Math-Verify).
    norm = NormalizationConfig(
        basic_latex=True, units=True, malformed_operators=True, nits=False, boxed="all", equations=False
    )
    pred_config = [
        LatexExtractionConfig(normalization_config=norm, boxed_match_priority=0, try_extract_without_anchor=False),
        ExprExtractionConfig(),
    ]
    return parse, verify, pred_config


def warmup() -> None:
    """Import Math-Verify now so the first scored sample does not pay for it."""
    _math_verify()


@functools.lru_cache(maxsize=4096)
def parse_gold(gold: str) -> list:
    """Parsed gold answer (cached: every sample of a prompt shares it); raises if unparseable.

    Bare gold (no $, \\boxed, \\(, \\[) is wrapped in $...$ first: parsed plain, "2\\pi" reads
    as 2 and "x=3" as 3. Then \\boxed{...}, then the raw string are tried.
    """
    parse, _, _ = _math_verify()
    bare = not any(d in gold for d in _MATH_DELIMITERS)
    candidates = [f"${gold}$", f"\\boxed{{{gold}}}", gold] if bare else [gold]
    for text in candidates:
        parsed = parse(text, parsing_timeout=None)
        if parsed:
            return parsed
    raise ValueError(f"math: cannot parse gold answer {gold!r}")


@register("math")
def math_reward(prompt: str, response: str, row: Mapping[str, Any], *, answer_key: str = "answer") -> float:
    """1.0 if Math-Verify finds the response's answer equal to row[answer_key], else 0.0.

    Gold is parsed first and passed first: verify(gold, pred) is asymmetric (intervals
    vs inequalities, equation chains). Prediction: first match, \\boxed{} preferred; when
    Math-Verify extracts nothing, the last balanced \\boxed{...} and then the last plain number
    are tried (an unclosed \\boxed{ of a truncated answer is not).
    """
    parse, verify, pred_config = _math_verify()
    gold = parse_gold(str(row[answer_key]))
    pred = parse(response, extraction_config=pred_config, extraction_mode="first_match", parsing_timeout=None)
    if not pred:  # nothing Math-Verify recognises: fall back to the last \boxed{} or the last number
        fallback = last_boxed(response)
        if fallback is None:
            numbers = _PLAIN_NUMBER.findall(response)
            fallback = numbers[-1] if numbers else None
        if fallback is None:
            return 0.0
        pred = parse(f"${fallback}$", parsing_timeout=None)
    return float(verify(gold, pred, timeout_seconds=None))


# A number standing alone: not part of a LaTeX command argument ("\frac12"), an exponent or a word.
_PLAIN_NUMBER = re.compile(r"(?<![\\\w^_{.])-?\d+(?:\.\d+)?(?!\w|\.\d)")


math_reward.warmup = warmup
