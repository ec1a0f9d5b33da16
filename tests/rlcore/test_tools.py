"""Tools: the calculator, the python tool in the code sandbox, user tools and their schemas, and a
runner on which a hanging, crashing or raising tool costs that call, never the run."""

import os
import time
from types import SimpleNamespace

import pytest

from rlcore.toolcall import ToolCall
from rlcore.tools import ToolError, ToolRunner, calculator, check_arguments, tool_specs

USER_TOOLS = '''
import os, time
from rlcore.tools import ToolError

def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b

def hang(x: str) -> str:
    """Never returns.

    Args:
        x: anything
    """
    while True:
        time.sleep(1)

def crash(x: str) -> str:
    """Kills its process.

    Args:
        x: anything
    """
    os._exit(3)

def boom(x: str, *, prefix: str = "") -> str:
    """Raises.

    Args:
        x: anything
    """
    if x == "tool-error":
        raise ToolError(prefix + "x must be a number")
    raise KeyError(x)

def no_docs(a):
    return a
'''


def term(name, args=None, schema=None):
    return SimpleNamespace(name=name, args=args or {}, schema=schema)


@pytest.fixture()
def user_file(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text(USER_TOOLS)
    return path


@pytest.mark.parametrize("expression, value", [("123*456", "56088"), (" (2+3)**2 - -1 ", "26"), ("7/2", "3.5"),
                                               ("7//2", "3"), ("10 % 4", "2"), ("2**64", str(2**64))])
def test_calculator_is_exact(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression, error", [
    ("__import__('os').system('ls')", "only numbers"), ("x + 1", "only numbers"), ("1/0", "division by zero"),
    ("2**1000", "exponents above 64"), ("(10**60)**60", "more than 1000 digits"), ("1+", "cannot parse"),
    ("1" * 600, "longer than 500"), ("1e300**2", "too large"),
])
def test_calculator_refuses_anything_but_bounded_arithmetic(expression, error):
    with pytest.raises(ToolError, match=error):
        calculator(expression)


def test_specs_take_schemas_from_the_tool_the_config_or_the_docstring(user_file):
    specs = tool_specs([term("calculator"), term(f"python:{user_file}:multiply"),
                        term(f"python:{user_file}:no_docs", schema={"name": "echo", "parameters": {
                            "type": "object", "properties": {"a": {"type": "string"}}}})])
    assert [s.exposed for s in specs] == ["calculator", "multiply", "echo"]
    mult = specs[1].schema["function"]
    assert mult["parameters"]["properties"]["a"] == {"type": "integer", "description": "the first factor"}
    assert specs[2].schema == {"type": "function", "function": {"name": "echo", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}}}}
    assert specs[1].name == f"python:{user_file}:multiply" and os.path.isabs(specs[1].name.split(":")[1])
    # A parameter the recipe binds is not the model's: it is left out of the derived schema.
    (boom,) = tool_specs([term(f"python:{user_file}:boom", {"prefix": "p"})])
    assert list(boom.schema["function"]["parameters"]["properties"]) == ["x"] and boom.args == {"prefix": "p"}


@pytest.mark.parametrize("terms, error", [
    ([term("abacus")], r"rollout.tools\[0\].name='abacus': unknown tool; built-ins: calculator, python"),
    ([term("python:missing.py:f")], r"tool file 'missing.py' not found .*fix the rollout.tools\[0\].name key"),
    ([term("calculator", {"precision": 3})], r"rollout.tools\[0\] \(calculator\): bad args"),
    ([term("calculator"), term("calculator")], r"rollout.tools\[1\]: a second tool named 'calculator'"),
])
def test_bad_tool_configs_name_the_key(terms, error):
    with pytest.raises(Exception, match=error):
        tool_specs(terms)


def test_a_tool_without_schema_or_docs_is_refused(user_file):
    with pytest.raises(ValueError, match=r"rollout.tools\[0\] .*no schema given.*rollout.tools\[0\].schema"):
        tool_specs([term(f"python:{user_file}:no_docs")])


def test_arguments_are_checked_against_the_schema():
    schema = calculator.schema
    assert check_arguments(schema, {"expression": "1+1"}) is None
    assert check_arguments(schema, {}) == "missing argument 'expression'"
    assert check_arguments(schema, {"expression": "1", "timeout_s": 99}) == \
        "unknown argument 'timeout_s'; calculator takes expression"  # the recipe's args are not the model's
    assert check_arguments(schema, {"expression": 12}) == "argument 'expression' must be a JSON string, got 12"


def test_failing_tools_cost_their_call_and_the_runner_keeps_serving(user_file):
    specs = tool_specs([term("calculator"), *(term(f"python:{user_file}:{fn}") for fn in ("multiply", "hang", "crash")),
                        term(f"python:{user_file}:boom", {"prefix": "boom: "})])
    runner = ToolRunner(specs, timeout_s=1.5, num_workers=2)
    try:
        calls = [ToolCall("hang", {"x": "1"}), ToolCall("crash", {"x": "1"}), ToolCall("boom", {"x": "tool-error"}),
                 ToolCall("boom", {"x": "k"}), ToolCall("abacus", {}), ToolCall("multiply", {"a": 3}),
                 ToolCall("", {}, error="the tool call is not valid JSON"), ToolCall("multiply", {"a": 6, "b": 7}),
                 ToolCall("calculator", {"expression": "1/0"})]
        start = time.monotonic()
        results = runner.run(calls)
        assert time.monotonic() - start < 10  # the hang cost its timeout, not the run
        contents = [r.content for r in results]
        assert contents[0] == "error: the tool timed out after 1.5 s" and results[0].seconds == 1.5
        assert contents[1].startswith("error: the tool failed (tool-worker died (exit code 3))")
        assert contents[2] == "error: boom: x must be a number"  # a ToolError's message, as the tool wrote it
        assert contents[3] == "error: KeyError: 'k'"
        assert contents[4] == "error: unknown tool 'abacus'; the tools are calculator, multiply, hang, crash, boom"
        assert contents[5] == "error: missing argument 'b'"
        assert contents[6] == "error: the tool call is not valid JSON"
        assert contents[7] == "42" and results[7].error is None  # an int comes back as JSON
        assert contents[8] == "error: division by zero"
        assert [r.error is None for r in results] == [False] * 7 + [True, False]
        # The killed workers were replaced: the next batch runs normally.
        assert runner.run([ToolCall("multiply", {"a": 2, "b": 5})])[0].content == "10"
    finally:
        runner.close()


def test_python_tool_runs_in_the_code_sandbox():
    from rewards.sandbox_host import probe

    missing = probe().missing
    if missing:
        if os.environ.get("RLCORE_SANDBOX_TESTS_ALLOW_MISSING") == "1":
            pytest.skip(f"sandbox guarantees missing here: {missing}")
        pytest.fail(f"the python tool needs the code sandbox; missing here: {missing} (apt-get install bubblewrap)")
    runner = ToolRunner(tool_specs([term("python", {"timeout_s": 1.0})]), timeout_s=10, num_workers=1)
    try:
        ok, bad, slow, escape = runner.run([
            ToolCall("python", {"code": "print(123 * 456)"}),
            ToolCall("python", {"code": "print('partial')\nraise ValueError('nope')"}),
            ToolCall("python", {"code": "while True: pass"}),
            ToolCall("python", {"code": "print(open('/etc/hostname').read())"}),
        ])
    finally:
        runner.close()
    assert ok.content == "56088\n" and ok.error is None
    assert bad.content.startswith("error: partial\n") and "ValueError: nope" in bad.content
    assert bad.content.endswith("[the program ended: crash]")
    assert slow.content.endswith("[the program ended: timeout]") and slow.error is not None
    assert escape.error is not None and ("No such file" in escape.content or "PermissionError" in escape.content)
