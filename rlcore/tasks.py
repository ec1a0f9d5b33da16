"""Built-in synthetic tasks: datasets that need no files, for the quickstart and the tests.

A task yields rows {"prompt": str, "answer": str}; the held-out split never shares a prompt with
the training split (the split is decided by a hash of the problem, so it is stable across runs).
"""

from __future__ import annotations

import hashlib
import json
import random

TASKS: dict[str, type] = {}


def _register(name: str):
    def deco(cls):
        if name in TASKS:
            raise ValueError(f"task {name!r} registered twice")
        TASKS[name] = cls
        return cls

    return deco


def tool_trace(tool: str, expression: str, value: str) -> list[dict[str, str]]:
    """The messages of one tool-use answer: the model calls `tool` ("calculator" in the Hermes format,
    "python" as a fenced block) on the expression, reads `value`, and answers it. The tool's output
    is written as the built-in tool prints it, so a warm start on the trace sees what RL will."""
    if tool == "calculator":
        call = json.dumps({"name": "calculator", "arguments": {"expression": expression}})
        content, output = f"<tool_call>{call}</tool_call>", value
    else:
        content, output = f"```python\nprint({expression})\n```", value + "\n"
    return [{"role": "assistant", "content": content}, {"role": "tool", "name": tool, "content": output},
            {"role": "assistant", "content": value}]


def _is_eval(key: str, eval_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h / 2**64 < eval_fraction


@_register("arithmetic")
class Arithmetic:
    """Multi-digit integer arithmetic: "37+45=" -> "82".

    Difficulty: `num_digits` (operands have 1..num_digits digits) and `ops` (a string of "+-*").
    Subtraction keeps results non-negative; the answer is the exact integer as text.
    `answer_format` sets the row's "target" (the text a warm start teaches; "answer" stays the integer):
        plain    "82"
        boxed    "\\boxed{82}"            (math-style; for the math and format rewards)
        steps    "37+45\n\n82"          (two steps separated by a blank line; for process rewards)
        program  "print(82)"             (a Python program; rows also get "tests" for the code reward)
        tool_calculator, tool_python     a tool-use trace (a list of chat messages): the model's call,
                 the tool's output, the model's answer "82". The call is Hermes-style
                 <tool_call>{"name": "calculator", "arguments": {"expression": "37+45"}}</tool_call>,
                 or a fenced ```python block printing 37+45 (rollout.tool_format=python_block).
    """

    FORMATS = ("plain", "boxed", "steps", "program", "tool_calculator", "tool_python")

    def __init__(self, *, num_digits: int = 2, ops: str = "+", answer_format: str = "plain",
                 eval_fraction: float = 0.1):
        if num_digits < 1:
            raise ValueError(f"data.task.num_digits={num_digits}: must be >= 1")
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"data.task.ops={ops!r}: use a non-empty string of '+', '-', '*'")
        if answer_format not in self.FORMATS:
            raise ValueError(f"data.task.answer_format={answer_format!r}: expected one of {', '.join(self.FORMATS)}")
        self.num_digits, self.ops, self.eval_fraction = num_digits, ops, eval_fraction
        self.answer_format = answer_format

    def _problem(self, rng: random.Random) -> dict[str, str]:
        hi = 10**self.num_digits - 1
        a, b, op = rng.randint(0, hi), rng.randint(0, hi), rng.choice(self.ops)
        if op == "-" and b > a:
            a, b = b, a
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        row = {"prompt": f"{a}{op}{b}=", "answer": str(value)}
        if self.answer_format.startswith("tool_"):
            row["target"] = tool_trace(self.answer_format.removeprefix("tool_"), f"{a}{op}{b}", str(value))
        else:
            row["target"] = {"plain": f"{value}", "boxed": f"\\boxed{{{value}}}",
                             "steps": f"{a}{op}{b}\n\n{value}", "program": f"print({value})"}[self.answer_format]
        if self.answer_format == "program":
            row["tests"] = [{"input": "", "output": str(value)}]
        return row

    def rows(self, split: str, num_rows: int, seed: int) -> list[dict[str, str]]:
        """`num_rows` problems of `split` ("train" or "eval"), deterministic given the seed."""
        rng = random.Random(f"{seed}-{split}")
        want_eval = split == "eval"
        rows, seen = [], set()
        space = len(self.ops) * 10 ** (2 * self.num_digits)
        max_unique = int(space * (self.eval_fraction if want_eval else 1 - self.eval_fraction))
        for _ in range(100 * num_rows + 1000):
            if len(rows) == num_rows:
                break
            row = self._problem(rng)
            if _is_eval(row["prompt"], self.eval_fraction) != want_eval:
                continue
            # Small problem spaces cannot give num_rows unique prompts; allow repeats only then.
            if row["prompt"] in seen and len(seen) < 0.9 * max_unique:
                continue
            seen.add(row["prompt"])
            rows.append(row)
        return rows
