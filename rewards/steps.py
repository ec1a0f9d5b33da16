"""Reasoning steps of a response: character spans, and the policy token that ends each step (spec §6).

A process reward model scores each step; the trainer puts step j's score on the policy token that
carries the last character of step j. The PRM's own separators live only in the PRM input, never
in the policy's tokens, so the mapping goes through character offsets of the policy's decoded text.
"""

from collections.abc import Callable, Sequence


def split_steps(response: str, separator: str = "\n\n") -> list[tuple[int, int]]:
    """(start, end) character spans of the steps of `response`, end exclusive.

    A step runs from its first character through the end of the separator that follows it; the
    last step runs to the end of the text. Empty or whitespace-only steps are dropped (their
    characters belong to no step), so a trailing separator makes no extra step and an empty
    response has none. No separator in the text -> one step.
    """
    if not separator:
        raise ValueError("separator must be a non-empty string")
    spans = []
    start = 0
    while start < len(response):
        found = response.find(separator, start)
        end = len(response) if found < 0 else found + len(separator)
        if response[start:end].removesuffix(separator).strip():
            spans.append((start, end))
        start = end
    return spans


def step_end_tokens(
    decode: Callable[[list[int]], str], token_ids: Sequence[int], char_ends: Sequence[int]
) -> list[int]:
    """Index of the policy token carrying character end-1 of `decode(token_ids)`, for each end in `char_ends`.

    decode: the policy tokenizer's decode (skip_special_tokens=True, as the response text was made).
    char_ends: strictly increasing step end offsets in that text (`split_steps` ends).

    A token may carry the separator merged with neighbouring text (".\\n\\nThe"): it ends the step.
    Per-token decodes are not concatenative for byte-level BPE, so each end is found by binary
    search over prefix decodes: the smallest k whose decode(ids[:k]) is at least `end` characters
    long and has the full text's character at end-1 (a character whose bytes are split across
    tokens decodes to U+FFFD until its last byte token is in). This assumes prefix decodes grow
    with k, true in practice; it costs O(len(char_ends) * log T) decodes.

    Ends past the text clamp to the last token. Indices are strictly increasing: a step whose end
    falls in the token that already ends the previous step moves to the next token; when no token
    is left it is dropped, with all later steps. So the result may be shorter than `char_ends`, and
    result[j] is always step j's token. No tokens -> [].
    """
    if any(b <= a for a, b in zip(char_ends, char_ends[1:])) or (char_ends and char_ends[0] <= 0):
        raise ValueError(f"char_ends must be positive and strictly increasing, got {list(char_ends)}")
    ids = list(token_ids)
    num_tokens = len(ids)
    if num_tokens == 0:
        return []
    text = decode(ids)
    prefixes = {num_tokens: text}

    def covers(k: int, end: int) -> bool:
        if k not in prefixes:
            prefixes[k] = decode(ids[:k])
        prefix = prefixes[k]
        return len(prefix) >= end and prefix[end - 1] == text[end - 1]

    indices: list[int] = []
    lo = 1  # ends increase, so each search starts where the previous one ended
    for end in char_ends:
        if end > len(text):
            k = num_tokens
        else:
            hi = num_tokens  # covers(num_tokens, end) holds: the prefix is the text
            while lo < hi:
                mid = (lo + hi) // 2
                if covers(mid, end):
                    hi = mid
                else:
                    lo = mid + 1
            k = lo
        lo = k
        index = max(k - 1, indices[-1] + 1) if indices else k - 1
        if index >= num_tokens:
            break
        indices.append(index)
    return indices
