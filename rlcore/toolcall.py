"""Tool calls in generated text, where a model turn ends, and the tool turn the chat template inserts.

Two call formats (rollout.tool_format):

    hermes        <tool_call>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool_call>
                  the Qwen2.5 / Qwen3 / Hermes chat-template format; the JSON may span lines, and
                  "arguments" may also be a JSON string holding the object (some models write that)
    python_block  ```python
                  print(12 * 34)
                  ```
                  a fenced block (```python, ```py or ```python3) is a call of the tool named
                  `python` with {"code": <the block>}; the plain alternative for models without a
                  tool-call format

Where a turn ends. Engines stop on single token ids. Where `</tool_call>` is one token of the
tokenizer (Qwen's added token) it is a stop id of every agent turn, so the turn ends exactly there.
Otherwise (the built-in character tokenizer: 12 tokens; a fenced block) the turn runs on to EOS or
its budget, and the first complete call ends it: the tokens after the one holding the call's last
character are discarded. Each token is sampled given only the ones before it, so discarding what
came after the call is the same as having stopped there (the kept tokens and their log-probs are
exactly what was sampled; nothing is re-tokenised).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

FORMATS = ("hermes", "python_block")
_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_PY_BLOCK = re.compile(r"```(?:python3|python|py)[ \t]*\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)
_HERMES_CLOSE = "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    """One call found in a model turn."""

    name: str
    """The tool's name as the model wrote it ("" when it could not be read)."""
    arguments: dict = field(default_factory=dict)
    """Keyword arguments of the tool ({} when they could not be read)."""
    end: int = 0
    """Offset in the turn's text just past the call's last character."""
    error: str | None = None
    """Why the call could not be read (bad JSON, no name): sent back to the model as the tool's output."""


def find_call(text: str, tool_format: str) -> ToolCall | None:
    """The first complete call in a model turn's text, or None."""
    if tool_format == "hermes":
        match = _HERMES.search(text)
        return None if match is None else _hermes_call(match.group(1), match.end())
    if tool_format == "python_block":
        match = _PY_BLOCK.search(text)
        return None if match is None else ToolCall("python", {"code": match.group(1)}, match.end())
    raise ValueError(f"rollout.tool_format={tool_format!r}: expected one of {', '.join(FORMATS)}")


def _hermes_call(body: str, end: int) -> ToolCall:
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall("", {}, end, f"the tool call is not valid JSON ({e.msg} at column {e.colno})")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return ToolCall("", {}, end, 'the tool call must be a JSON object {"name": ..., "arguments": {...}}')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # {"arguments": "{\"x\": 1}"}
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(call["name"], {}, end, '"arguments" of the tool call must be a JSON object')
    return ToolCall(call["name"], arguments, end)


def stop_token_ids(tokenizer, tool_format: str) -> list[int]:
    """Stop ids that end an agent turn at a call: `</tool_call>` where it is one token; else none."""
    if tool_format != "hermes":
        return []
    ids = tokenizer(_HERMES_CLOSE, add_special_tokens=False)["input_ids"]
    return ids if len(ids) == 1 else []


def tokens_through(tokenizer, ids: list[int], end: int) -> int:
    """How many of `ids` it takes to decode at least the first `end` characters of their text
    (decoded as find_call saw it: special tokens kept). Binary search: O(log n) decodes."""
    full = decode_turn(tokenizer, ids)
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode_turn(tokenizer, ids[:mid])) >= end:
            hi = mid
        else:
            lo = mid + 1
    # A prefix ending inside a multi-byte character decodes to a replacement character: step on until
    # the prefix text agrees with the whole turn's.
    while lo < len(ids) and decode_turn(tokenizer, ids[:lo])[:end] != full[:end]:
        lo += 1
    return lo


def decode_turn(tokenizer, ids: list[int]) -> str:
    """A model turn's text as calls are searched in: special tokens kept (Qwen's <tool_call> is one)."""
    return tokenizer.decode(ids, skip_special_tokens=False)


class ToolTurns:
    """Token ids the chat template inserts after a model turn that ended with a tool call: the end of
    the assistant turn, the tool turn holding the tool's output, and the start of the next assistant
    turn (its generation prompt).

    Rendered by the tokenizer's own chat template: [user, assistant(X)] and the same plus a tool
    message with the generation prompt; the text after X in both is the tool turn (X being a marker
    the template prints verbatim). Rendered per call, so templates that transform the tool's content
    (JSON-encode it, wrap it in <tool_response>) are followed exactly. Its ids come from tokenising
    that text alone, the way the template's text is tokenised in a prompt.
    """

    MARKER = "RLCORE-ASSISTANT-TURN"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("rollout.tools needs a chat template to insert the tool turns; this tokenizer has none "
                             "(set one on the tokenizer of model.path, e.g. Qwen2.5's)")
        self.tokenizer = tokenizer
        self.text("calculator", "0")  # fail now, naming the template, rather than mid-rollout

    def text(self, name: str, content: str) -> str:
        """The template's text between a model turn ending in a call and the next model turn."""
        user = {"role": "user", "content": "u"}
        turn = {"role": "assistant", "content": self.MARKER}
        tool = {"role": "tool", "name": name, "content": content}
        try:
            before = self.tokenizer.apply_chat_template([user, turn], tokenize=False)
            after = self.tokenizer.apply_chat_template([user, turn, tool], tokenize=False, add_generation_prompt=True)
        except Exception as e:
            raise ValueError(f"the chat template cannot render a tool turn after an assistant turn "
                             f"({type(e).__name__}: {e}); rollout.tools needs a template with a 'tool' role "
                             "(Qwen2.5, Qwen3, Hermes)") from e
        cut = before.rfind(self.MARKER) + len(self.MARKER)
        if cut < len(self.MARKER) or not after.startswith(before[:cut]):
            raise ValueError("the chat template renders an assistant turn differently once a tool turn follows "
                             "it; rlcore cannot tell which tokens the tool turn adds (use a Qwen2.5 / Qwen3 / "
                             "Hermes template)")
        return after[cut:]

    def ids(self, name: str, content: str) -> list[int]:
        """Token ids of text(name, content) (the template's special tokens as their own ids)."""
        return self.tokenizer(self.text(name, content), add_special_tokens=False)["input_ids"]
