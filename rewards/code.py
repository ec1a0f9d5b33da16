"""`code` reward: the fraction of a row's tests that the response's Python program passes.

Each test runs the program in its own sandboxed interpreter (`rewards.sandbox`, ~30-60 ms of start-up
per test on a 2-core machine); assert-style tests are judged by one more interpreter per sample, which
the program never controls. Every failure of the program (syntax error, crash, timeout, memory, output
limit) fails that test; only bad test data raises. Where the machine cannot give every guarantee of the
sandbox, the reward refuses to run unless `allow_missing` names what is missing (docs/rewards.md).
"""

import json
import re
from collections.abc import Mapping
from typing import Any

from rewards.registry import register
from rewards.sandbox import run_assert_tests, run_python
from rewards.sandbox_host import check, probe

_FENCE = re.compile(r"^\s*```")
_PYTHON_TAGS = ("", "python", "py", "python3")


@register("code")
def code_reward(
    prompt: str,
    response: str,
    row: Mapping[str, Any],
    *,
    tests_key: str = "tests",
    timeout_s: float = 2.0,
    memory_mb: int = 512,
    max_processes: int = 8,
    max_file_mb: int = 16,
    max_open_files: int = 128,
    max_output_bytes: int = 1_000_000,
    allow_missing: list[str] | tuple[str, ...] = (),
) -> float:
    """Fraction of the tests in row[tests_key] that the program passes (0.0 .. 1.0).

    Program: the last ```python (or untagged ```) block of the response, else the whole response.
    row[tests_key]: a list, or a JSON string of one. Each test is either
      {"input": str, "output": str}: run the program with that stdin; passes iff it exits 0 and
        its stdout equals "output" up to trailing whitespace on each line and trailing blank
        lines. An "output" that is empty after that never passes: a program that prints nothing
        would pass it, so it cannot tell a solution from no solution (fix the data).
      str: assert-style Python, run by the judge against the program (rewards/sandbox_judge.py);
        passes iff it runs to its end and the program ran to its own end first (a program that
        calls sys.exit(0) or os._exit(0) fails). The program's results reach the test as plain data
        (None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset); a test that
        compares one of the program's own objects fails, and builtins are always Python's own.
    Limits are per test: timeout_s of wall clock from the program's start, not counting the time it
    waits for the judge (also its CPU limit),
    memory_mb for everything it holds, max_processes, max_file_mb, max_open_files, max_output_bytes.
    reward.timeout_s, the worker pool's limit per call, must exceed the sum over a row's tests:
    len(tests) * (timeout_s + ~0.1 s) + ~0.1 s, or one slow program scores 0 for all its tests.
    A syntax error stops after the first test. allow_missing: sandbox guarantees ("isolation",
    "memory_cap", "process_cap") to run without where the machine lacks them; without it the reward
    refuses (SandboxError). Raises ValueError (scored 0 and counted by CompositeReward) for bad test data.
    """
    tests = load_tests(row, tests_key)
    program = extract_program(response)
    limits = dict(timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes, max_file_mb=max_file_mb,
                  max_open_files=max_open_files, max_output_bytes=max_output_bytes, allow_missing=tuple(allow_missing))
    num_passed = 0
    for test in tests:
        if isinstance(test, str) or not (expected := normalize_output(test["output"])):
            continue  # asserts: below, with one judge; empty expected output: never a pass, so not run
        result = run_python(program, stdin=test["input"], **limits)
        if result.status == "syntax_error":
            return num_passed / len(tests)  # the program does not compile: every other test fails the same way
        num_passed += result.status == "ok" and normalize_output(result.stdout) == expected
    asserts = [test for test in tests if isinstance(test, str)]
    if asserts:
        num_passed += sum(verdict.passed for verdict in run_assert_tests(program, asserts, **limits))
    return num_passed / len(tests)


def preflight(*, allow_missing: list[str] | tuple[str, ...] = (), **_limits: Any) -> None:
    """Before training: raise SandboxError if this machine lacks a guarantee not named in allow_missing."""
    check(tuple(allow_missing))


code_reward.preflight = preflight
code_reward.warmup = probe  # each worker probes the machine (~0.2 s) before its first sample


def extract_program(response: str) -> str:
    """The last fenced block tagged python/py/python3 or untagged; else the whole response.

    A block still open at the end of the response (generation cut off) counts as a block.
    """
    blocks, tag, lines = [], None, []
    for line in response.splitlines():
        if _FENCE.match(line):
            if tag is None:
                info = line.strip()[3:].split()  # "```python title=x" -> ["python", "title=x"]
                tag, lines = info[0].lower() if info else "", []
            else:
                blocks.append((tag, lines))
                tag = None
        elif tag is not None:
            lines.append(line)
    if tag is not None:
        blocks.append((tag, lines))
    python_blocks = [lines for tag, lines in blocks if tag in _PYTHON_TAGS]
    return "\n".join(python_blocks[-1]) + "\n" if python_blocks else response


def normalize_output(text: str) -> list[str]:
    """Lines without trailing whitespace, trailing blank lines dropped ("" -> [])."""
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def load_tests(row: Mapping[str, Any], tests_key: str) -> list[str | dict[str, str]]:
    """row[tests_key] as a checked list of tests; raises ValueError saying what to fix."""
    where = f"code reward: row[{tests_key!r}]"
    if tests_key not in row:
        raise ValueError(f"{where} is missing (row keys: {list(row)}); set the reward's tests_key "
                         "kwarg to the column that holds the tests")
    tests = row[tests_key]
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is a string but not JSON ({e}); store a list of tests or its JSON") from None
    if not isinstance(tests, list) or not tests:
        raise ValueError(f"{where} must be a non-empty list of tests (dicts with 'input' and 'output' "
                         f"strings, or assert-style Python strings), got {_preview(tests)}")
    for i, test in enumerate(tests):
        if isinstance(test, str):
            try:
                compile(test, f"test {i}", "exec")
            except (SyntaxError, ValueError) as e:
                raise ValueError(f"{where}[{i}] is not valid Python: {e}") from None
        elif not (isinstance(test, dict) and isinstance(test.get("input"), str)
                  and isinstance(test.get("output"), str)):
            raise ValueError(f"{where}[{i}] must be a dict with 'input' and 'output' strings, or a string of "
                             f"assert-style Python; got {_preview(test)}")
    return tests


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
