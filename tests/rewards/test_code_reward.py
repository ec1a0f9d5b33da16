"""`code` reward: program extraction, test formats, scoring, bad data, the sandbox's statuses."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest

import rewards.code as code_module
from rewards import REWARDS, CompositeReward
from rewards.code import extract_program, normalize_output
import rewards.sandbox as sandbox_module
from rewards.sandbox import run_assert_tests, run_python

code = REWARDS["code"]

DOUBLE = "print(int(input()) * 2)"
STDIO_TESTS = [{"input": "2\n", "output": "4\n"}, {"input": "5", "output": "10"}, {"input": "7\n", "output": "14"}]


def fenced(program: str, tag: str = "python") -> str:
    return f"Here is my solution.\n```{tag}\n{program}\n```\nIt reads n and prints 2n."


def test_stdin_stdout_pass_and_fail():
    assert code("p", fenced(DOUBLE), {"tests": STDIO_TESTS}) == 1.0
    assert code("p", fenced("print(int(input()) * 3)"), {"tests": STDIO_TESTS}) == 0.0


def test_assert_style_pass_and_fail():
    program = "def add(a, b):\n    return a + b"
    assert code("p", fenced(program), {"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}) == 1.0
    assert code("p", fenced(program), {"tests": ["assert add(1, 2) == 4"]}) == 0.0
    assert code("p", fenced(program), {"tests": ["assert sub(1, 2) == -1"]}) == 0.0  # NameError


def test_partial_credit_is_the_exact_fraction():
    # Wrong only for 7: passes "2"->"4" and "5"->"10", fails "7"->"14". 2 of 3.
    program = "n = int(input())\nprint(n * 2 if n != 7 else 0)"
    assert code("p", fenced(program), {"tests": STDIO_TESTS}) == 2 / 3
    # Mixed kinds in one list: 1 of 2.
    mixed = [{"input": "1", "output": "2"}, "assert False"]
    assert code("p", fenced(DOUBLE), {"tests": mixed}) == 0.5


def test_exit_before_the_asserts_does_not_pass_them():
    # A program that ends the interpreter early (exit code 0) must not skip its way to a pass.
    tests = ["assert f(1) == 2"]
    for escape in ("import sys; sys.exit(0)", "import os; os._exit(0)", "exit()"):
        assert code("p", fenced(f"def f(x):\n    return 0\n{escape}"), {"tests": tests}) == 0.0
    # Only running to the end passes, so even a test's own early exit(0) is a fail.
    assert code("p", fenced("def f(x):\n    return 2"), {"tests": ["assert f(1) == 2\nraise SystemExit(0)"]}) == 0.0


def test_last_python_or_untagged_block_wins():
    response = (
        "First try:\n```python\nprint('first')\n```\n"
        "In C++:\n```cpp\nint main() { return 0; }\n```\n"
        "Final:\n```\nprint('last')\n```\nDone."
    )
    assert extract_program(response) == "print('last')\n"
    assert extract_program("```py\nx = 1\n```\n```text\nnot code\n```") == "x = 1\n"
    assert extract_program("```Python title=sol.py\nx = 2\n```") == "x = 2\n"
    assert extract_program("print(42)") == "print(42)"  # no fence: the whole response
    assert extract_program("```python\nprint(1)\nprint(2)") == "print(1)\nprint(2)\n"  # cut off mid-block
    tests = [{"input": "", "output": "last"}]
    assert code("p", response, {"tests": tests}) == 1.0
    assert code("p", "The answer:\nprint('last')", {"tests": tests}) == 0.0  # prose: syntax error


def test_tests_as_json_string_and_custom_key():
    row = {"checks": json.dumps(STDIO_TESTS)}
    assert code("p", fenced(DOUBLE), row, tests_key="checks") == 1.0


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"answer": "4"}, r"row\['tests'\] is missing \(row keys: \['answer'\]\); set the reward's tests_key"),
        ({"tests": []}, "must be a non-empty list of tests"),
        ({"tests": {"input": "1", "output": "2"}}, "must be a non-empty list of tests"),
        ({"tests": "not json"}, "is a string but not JSON"),
        ({"tests": "{}"}, "must be a non-empty list of tests"),
        ({"tests": [{"input": "1"}]}, r"row\['tests'\]\[0\] must be a dict with 'input' and 'output' strings"),
        ({"tests": [{"input": 1, "output": "2"}]}, r"\[0\] must be a dict with 'input' and 'output' strings"),
        ({"tests": ["assert f(1) == 2", "assert f(("]}, r"row\['tests'\]\[1\] is not valid Python"),
    ],
)
def test_bad_test_data_raises_a_clear_error(row, message):
    with pytest.raises(ValueError, match=message):
        code("p", fenced(DOUBLE), row)


def test_syntax_error_scores_zero_and_stops_early(monkeypatch):
    calls = []

    def counting_run(*args, **kwargs):
        calls.append(1)
        return run_python(*args, **kwargs)

    monkeypatch.setattr(code_module, "run_python", counting_run)
    assert code("p", fenced("def f(:\n    pass"), {"tests": STDIO_TESTS}) == 0.0
    assert len(calls) == 1  # the other two tests would fail the same way


def test_syntax_error_in_assert_tests_starts_the_program_once(monkeypatch):
    roles = []

    class CountingRun(sandbox_module.Run):
        def __init__(self, host, role, *args, **kwargs):
            roles.append(role)
            super().__init__(host, role, *args, **kwargs)

    monkeypatch.setattr(sandbox_module, "Run", CountingRun)
    verdicts = run_assert_tests("def f(:\n    pass", ["assert f(1) == 2"] * 3, timeout_s=2.0)
    assert [(v.passed, v.status) for v in verdicts] == [(False, "syntax_error")] * 3
    assert roles == ["judge", "serve"]  # one judge, and the program started once


def test_empty_expected_output_never_passes():
    # A test expecting no output cannot tell a solution from `pass`, so it never passes
    # (documented choice); it still counts in the denominator.
    assert code("p", fenced("pass"), {"tests": [{"input": "", "output": ""}]}) == 0.0
    assert code("p", fenced("print()"), {"tests": [{"input": "", "output": "\n  \n"}]}) == 0.0
    row = {"tests": [{"input": "", "output": ""}, {"input": "3", "output": "6"}]}
    assert code("p", fenced(DOUBLE), row) == 0.5
    # And a program that prints nothing never matches a non-empty expected output.
    assert code("p", fenced("pass"), {"tests": [{"input": "3", "output": "6"}]}) == 0.0


def test_output_comparison_ignores_trailing_whitespace_only():
    assert normalize_output("a  \r\nb\n\n\n") == ["a", "b"]
    assert normalize_output("") == []
    assert normalize_output(" a") == [" a"]  # leading whitespace matters
    tests = [{"input": "", "output": "1 2\n3\n"}]
    assert code("p", fenced("print('1 2   ')\nprint(3)\nprint()"), {"tests": tests}) == 1.0
    assert code("p", fenced("print('1  2')\nprint(3)"), {"tests": tests}) == 0.0
    assert code("p", fenced("print(1, 2)\nprint(3)"), {"tests": tests}) == 1.0


def test_failures_score_zero_and_are_never_raised():
    tests = [{"input": "", "output": "ok"}]
    for program in (
        "raise RuntimeError('boom')",  # crash
        "print('ok'); raise SystemExit(3)",  # right output, nonzero exit
        "x = bytearray(4 * 1024 ** 3)\nprint('ok')",  # memory
        "while True:\n    print('ok' * 1000)",  # output limit
        "import time\ntime.sleep(5)\nprint('ok')",  # timeout
    ):
        assert code("p", fenced(program), {"tests": tests}, timeout_s=1.0) == 0.0, program


@pytest.mark.parametrize(
    ("source", "status", "returncode"),
    [
        ("print('hi')", "ok", 0),
        ("import sys; sys.exit(4)", "crash", 4),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "crash", -11),
        ("def f(:", "syntax_error", 1),
        ("x = ' ' * (2 * 1024 ** 3)", "memory", 1),
        ("while True: pass", "timeout", None),
        ("while True: print('x' * 100)", "output_limit", None),
    ],
)
def test_run_python_statuses(source, status, returncode):
    result = run_python(source, timeout_s=1.0, memory_mb=256, max_output_bytes=10_000)
    assert (result.status, result.returncode) == (status, returncode), result.stderr[-500:]
    assert len(result.stdout) <= 10_000


def test_cpu_limit_stops_a_busy_program_before_the_wall_clock():
    result = run_python("while True: pass", timeout_s=5.0, cpu_s=1.0)
    assert result.status == "timeout"
    assert result.returncode == -24  # SIGXCPU at the soft CPU limit
    assert result.seconds < 4.0


@pytest.fixture
def temp_dir(monkeypatch):
    """A fresh dir as tempfile's default that the sandbox uses: others may search it (0o711)."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="rlcore-code-test-"))
    path.chmod(0o711)
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    yield path
    shutil.rmtree(path)


def test_work_dir_is_private_and_removed_afterwards(temp_dir):
    program = "import os\nopen('scratch.txt', 'w').write('x')\nprint(os.listdir(), os.getcwd() == os.environ['HOME'])"
    result = run_python(program, timeout_s=2.0)
    assert result.status == "ok"
    assert "['scratch.txt'] True" in result.stdout
    assert list(temp_dir.iterdir()) == []
    # Also after a timeout, with a file left open.
    result = run_python("f = open('a', 'w')\nf.write('x')\nwhile True: pass", timeout_s=0.5)
    assert result.status == "timeout"
    assert list(temp_dir.iterdir()) == []


def test_ordinary_file_work_in_the_work_dir_is_allowed():
    # The audit hook must not refuse what honest programs do: temp files, dirs, fd-relative ops.
    program = """
import os, shutil, tempfile
os.makedirs("d/e")
with open("d/e/f.txt", "w") as f:
    f.write("1")
os.rename("d/e/f.txt", "d/g.txt")
shutil.rmtree("d")
with tempfile.TemporaryDirectory() as t, tempfile.NamedTemporaryFile("w", dir=t) as f:
    f.write("x")
with open(os.devnull, "w") as f:
    print("quiet", file=f)
print(sorted(os.listdir()), "def " in open(os.__file__).read())  # reading the standard library is fine
"""
    result = run_python(program, timeout_s=2.0)
    assert (result.status, result.stdout) == ("ok", "[] True\n"), result.stderr[-1000:]


def test_a_temp_dir_closed_to_others_is_not_used(tmp_path, monkeypatch):
    # pytest's tmp_path lies in /tmp/pytest-of-<user> (0700): the run's uid could not enter it.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert code("p", fenced(DOUBLE), {"tests": STDIO_TESTS}) == 1.0
    assert list(tmp_path.iterdir()) == []


def test_composite_scores_a_batch_with_the_worker_pool():
    responses = [
        fenced(DOUBLE),  # 3 of 3
        fenced("n = int(input())\nprint(n * 2 if n != 7 else 0)"),  # 2 of 3
        fenced("print(int(input()) + 1)"),  # 0 of 3
        "no code here at all",  # syntax error: 0
    ]
    rows = [{"tests": STDIO_TESTS}] * 3 + [{"tests": json.dumps(STDIO_TESTS)}]
    with CompositeReward([("code", 1.0, {})], timeout_s=30.0, num_workers=2) as reward:
        result = reward(["p"] * 4, responses, rows)
        bad = reward(["p"], [fenced(DOUBLE)], [{"answer": "4"}])
    assert result.components["code"] == [1.0, 2 / 3, 0.0, 0.0]
    assert result.metrics["reward/code/errors"] == 0.0
    assert result.metrics["reward/code/timeouts"] == 0.0
    # Bad data scores 0 and is counted as an error, not raised.
    assert bad.scores == [0.0]
    assert bad.metrics["reward/code/errors"] == 1.0
