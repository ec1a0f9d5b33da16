"""Tools the policy calls during rollout: built-in `calculator` and `python`, and user tools.

A tool is a function fn(**arguments, **args) -> str. `arguments` are what the model wrote in its call,
checked against the tool's JSON schema before it runs; `args` are the recipe's rollout.tools[i].args
(limits and the like: the model cannot set them, as an argument the schema does not list is refused).
The string returned is what the model reads in the tool turn; a value that is not a string is sent as
JSON. A tool that raises ToolError sends its message; any other exception, a timeout
(rollout.tool_timeout_s) or a crash of its worker sends an "error: ..." line. All of those are counted
(agent/tool_errors) and cost the sample that turn, never the run.

Every call runs in a worker process (rewards.pool.WorkerPool: spawned, killed and replaced on a
timeout), so a tool that hangs or crashes cannot take the trainer with it. `python` runs the model's
code in the `code` reward's sandbox (rewards.sandbox.run_python: its isolation and limits per call).

    rollout:
      max_turns: 3
      tools:
        - {name: calculator}
        - {name: python, args: {timeout_s: 5}}
        - {name: "python:my_tools.py:lookup", schema: {...}}   # schema optional: see tool_specs
"""

from __future__ import annotations

import ast
import inspect
import json
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rewards.user import USER_PREFIX, canonical_user_name, load_user_fn

TOOLS: dict[str, Callable[..., str]] = {}
"""Built-in tools by name (rollout.tools[i].name)."""


class ToolError(Exception):
    """Raised by a tool: its message is the tool's output the model reads (counted as an error)."""


def register_tool(name: str, schema: dict) -> Callable:
    """Decorator: TOOLS[name] = fn, with its JSON schema (the function part) as fn.schema."""

    def add(fn):
        if name in TOOLS:
            raise ValueError(f"tool {name!r} registered twice")
        fn.schema = {"type": "function", "function": {"name": name, **schema}}
        TOOLS[name] = fn
        return fn

    return add


# ---------------------------------------------------------------------------------------- built-ins

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_MAX_EXPRESSION_CHARS = 500
_MAX_RESULT_DIGITS = 1000


@register_tool("calculator", {
    "description": "Evaluate an arithmetic expression exactly (integers stay exact).",
    "parameters": {"type": "object", "required": ["expression"], "properties": {
        "expression": {"type": "string",
                       "description": "numbers with + - * / // % ** and parentheses, e.g. 123*456"}}}})
def calculator(expression: str) -> str:
    """The value of an arithmetic expression of numbers, + - * / // % ** and parentheses, as text.
    Parsed, never eval'd; exponents and results are bounded so no call runs long."""
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is longer than {_MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ToolError(f"cannot parse {expression!r}: {e.msg}") from None
    try:
        value = _evaluate(tree.body)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:  # floats: 1e300**2
        raise ToolError("the result is too large") from None
    return str(value)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ToolError("exponents above 64 are not allowed")
        value = _OPERATORS[type(node.op)](left, right)
        if isinstance(value, complex):
            raise ToolError("the result is not a real number")
        if isinstance(value, int) and value.bit_length() > 3.33 * _MAX_RESULT_DIGITS:
            raise ToolError(f"the result has more than {_MAX_RESULT_DIGITS} digits")
        return value
    raise ToolError(f"only numbers, + - * / // % ** and parentheses are allowed, not {ast.unparse(node)!r}")


@register_tool("python", {
    "description": "Run a Python program in a sandbox and return what it prints (stdout).",
    "parameters": {"type": "object", "required": ["code"], "properties": {
        "code": {"type": "string", "description": "a complete Python program; print what you need"}}}})
def python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512, max_processes: int = 8, max_file_mb: int = 16,
           max_open_files: int = 128, max_output_bytes: int = 10_000,
           allow_missing: list[str] | tuple[str, ...] = ()) -> str:
    """Run `code` as a program in the code reward's sandbox (its limits, per call; docs/rewards.md);
    its stdout, or a ToolError holding stdout, the end of stderr and how it ended."""
    from rewards.sandbox import run_python

    result = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes,
                        max_file_mb=max_file_mb, max_open_files=max_open_files, max_output_bytes=max_output_bytes,
                        allow_missing=tuple(allow_missing))
    if result.status == "ok":
        return result.stdout
    raise ToolError(f"{result.stdout}{result.stderr[-1000:]}[the program ended: {result.status}]")


def _python_preflight(*, allow_missing=(), **_limits) -> None:
    from rewards.sandbox_host import check

    check(tuple(allow_missing))


def _python_warmup() -> None:
    from rewards.sandbox_host import probe

    probe()


python.preflight = _python_preflight
python.warmup = _python_warmup  # each worker probes the machine once, before its first call


# ------------------------------------------------------------------------------- specs and workers

def resolve_tool(name: str, *, index: int | None = None) -> Callable[..., Any]:
    """A built-in tool, or the function of a python:path/file.py:fn name (imported once per process)."""
    key = f"rollout.tools[{'i' if index is None else index}].name"
    if name.startswith(USER_PREFIX):
        return load_user_fn(name, what="tool", key=key)
    if name not in TOOLS:
        raise ValueError(f"{key}={name!r}: unknown tool; built-ins: {', '.join(sorted(TOOLS))}, or "
                         f"{USER_PREFIX}path/to/file.py:fn for your own")
    return TOOLS[name]


@dataclass(frozen=True)
class ToolSpec:
    """One configured tool."""

    name: str
    """rollout.tools[i].name: a built-in, or python:path/file.py:fn with an absolute path."""
    schema: dict
    """{"type": "function", "function": {"name", "description", "parameters"}}: handed to the chat template."""
    args: dict
    """rollout.tools[i].args, bound on every call."""

    @property
    def exposed(self) -> str:
        """The name the model calls it by."""
        return self.schema["function"]["name"]


def tool_specs(terms: list) -> list[ToolSpec]:
    """Resolve rollout.tools (objects with name, args, schema) into specs, checking each: the function
    exists, its args bind, its machine prerequisites hold (python: the sandbox), the names the model
    calls are unique. The schema is the term's own, else the function's `schema` attribute, else
    derived from its type hints and docstring (transformers.utils.get_json_schema: Google-style
    "Args:" section)."""
    specs = []
    for i, term in enumerate(terms):
        fn = resolve_tool(term.name, index=i)
        args = dict(term.args)
        try:
            inspect.signature(fn).bind_partial(**args)
        except TypeError as e:
            raise ValueError(f"rollout.tools[{i}] ({term.name}): bad args {args}: {e}") from None
        schema = _schema(fn, term.schema, i, term.name, bound=set(args))
        if getattr(fn, "preflight", None) is not None:
            fn.preflight(**args)
        name = canonical_user_name(term.name) if term.name.startswith(USER_PREFIX) else term.name
        specs.append(ToolSpec(name, schema, args))
    exposed = [s.exposed for s in specs]
    for i, e in enumerate(exposed):
        if e in exposed[:i]:
            raise ValueError(f"rollout.tools[{i}]: a second tool named {e!r} (the name in its schema); names must "
                             "differ, as the model calls tools by name")
    return specs


def _schema(fn, given: dict | None, i: int, name: str, bound: set[str]) -> dict:
    """The tool's JSON schema; parameters the recipe binds (rollout.tools[i].args) are left out of a
    derived one: the model cannot set them."""
    if given:
        schema = dict(given)
        if "function" not in schema:  # the function part alone: wrap it
            schema = {"type": "function", "function": schema}
    elif getattr(fn, "schema", None):
        schema = fn.schema
    else:
        from transformers.utils import get_json_schema

        try:
            schema = get_json_schema(_without(fn, bound))
        except Exception as e:
            raise ValueError(f"rollout.tools[{i}] ({name}): no schema given and none can be derived from the "
                             f"function ({e}); give rollout.tools[{i}].schema, or type hints and an 'Args:' "
                             "docstring section") from None
    function = schema.get("function", {})
    if not isinstance(function.get("name"), str) or not isinstance(function.get("parameters", {}), dict):
        raise ValueError(f"rollout.tools[{i}].schema: needs function.name (a string) and function.parameters "
                         f"(a JSON-schema object); got {schema}")
    return schema


def _without(fn, bound: set[str]):
    """A stand-in for fn whose signature and annotations lack the `bound` parameters (for deriving
    the schema; __wrapped__ lets get_type_hints resolve names in fn's module)."""
    def view(*args, **kwargs):
        return fn(*args, **kwargs)

    signature = inspect.signature(fn)
    view.__signature__ = signature.replace(parameters=[p for p in signature.parameters.values() if p.name not in bound])
    view.__annotations__ = {k: v for k, v in getattr(fn, "__annotations__", {}).items() if k not in bound}
    view.__name__, view.__doc__, view.__wrapped__ = fn.__name__, fn.__doc__, fn
    return view


def worker_tool(name: str) -> Callable[..., tuple[str, str | None, float]]:
    """The resolver the tool workers use: a callable(arguments, **args) -> (output, error or None,
    seconds) that never raises, so the tool's own error text reaches the model as it wrote it."""
    fn = resolve_tool(name)

    def call(arguments: dict, **args) -> tuple[str, str | None, float]:
        start = time.perf_counter()
        try:
            value = fn(**arguments, **args)
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            return text, None, time.perf_counter() - start
        except ToolError as e:
            return f"error: {e}", str(e), time.perf_counter() - start
        except BaseException as e:  # SystemExit from user code included: the worker keeps serving
            message = f"{type(e).__name__}: {e}"
            return f"error: {message}", message, time.perf_counter() - start

    call.warmup = getattr(fn, "warmup", None) or (lambda: None)
    return call


def check_arguments(schema: dict, arguments: dict) -> str | None:
    """Why the model's arguments do not fit the tool's JSON schema (names, required, basic types), or None."""
    params = schema["function"].get("parameters") or {}
    properties = params.get("properties") or {}
    unknown = [k for k in arguments if k not in properties]
    if unknown:
        return f"unknown argument {unknown[0]!r}; {schema['function']['name']} takes {', '.join(properties) or 'none'}"
    missing = [k for k in params.get("required", []) if k not in arguments]
    if missing:
        return f"missing argument {missing[0]!r}"
    for key, value in arguments.items():
        want = properties[key].get("type") if isinstance(properties[key], dict) else None
        if want in _JSON_TYPES and not _JSON_TYPES[want](value):
            return f"argument {key!r} must be a JSON {want}, got {json.dumps(value)}"
    return None


_JSON_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


# ------------------------------------------------------------------------------------ the runner

@dataclass(frozen=True)
class ToolResult:
    """What one call gave back."""

    content: str
    """What the model reads in the tool turn: the tool's output, or "error: ..."."""
    error: str | None
    """Why the call failed (bad call, unknown tool or arguments, the tool's error, a timeout, a crash), or None."""
    seconds: float
    """Time the tool ran (the limit for a timeout; 0 for a call refused before running)."""


class ToolRunner:
    """Runs a batch of calls in worker processes, each with the wall-clock limit `timeout_s` (a
    worker past it is killed and replaced). Calls that cannot run (unreadable, unknown tool, arguments
    that do not fit the schema) are answered at once without a worker."""

    def __init__(self, specs: list[ToolSpec], *, timeout_s: float, num_workers: int):
        from rewards.pool import WorkerPool

        self.specs, self.timeout_s = specs, timeout_s
        self._index = {s.exposed: i for i, s in enumerate(specs)}
        self._pool = WorkerPool([s.name for s in specs], [s.args for s in specs], num_workers=num_workers,
                                timeout_s=timeout_s, resolver="rlcore.tools:worker_tool", results="any",
                                name="tool-worker")

    @property
    def schemas(self) -> list[dict]:
        """The tools' JSON schemas, for the chat template (its `tools` argument)."""
        return [s.schema for s in self.specs]

    def run(self, calls: list) -> list[ToolResult]:
        """One result per rlcore.toolcall.ToolCall, in order; the runnable ones in parallel."""
        results: list[ToolResult | None] = [None] * len(calls)
        tasks, where = [], []
        for j, call in enumerate(calls):
            refusal = call.error or self._refusal(call)
            if refusal is not None:
                results[j] = ToolResult(f"error: {refusal}", refusal, 0.0)
            else:
                tasks.append((self._index[call.name], call.arguments))
                where.append(j)
        for j, (value, error, timed_out) in zip(where, self._pool.run(tasks) if tasks else []):
            if value is not None:
                results[j] = ToolResult(*value)
                continue
            why = f"the tool timed out after {self.timeout_s:g} s" if timed_out else f"the tool failed ({error})"
            results[j] = ToolResult(f"error: {why}", why, self.timeout_s if timed_out else 0.0)
        return results  # type: ignore[return-value]  # every slot is filled

    def _refusal(self, call) -> str | None:
        if call.name not in self._index:
            return f"unknown tool {call.name!r}; the tools are {', '.join(self._index)}"
        return check_arguments(self.specs[self._index[call.name]].schema, call.arguments)

    def close(self) -> None:
        self._pool.close()
