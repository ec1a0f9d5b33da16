"""The judge: runs a sample's assert-style tests in a fresh interpreter that the program never controls.

Each test's code runs here, in its own namespace. A name the test uses that is neither its own nor a
builtin is the program's: it is looked up in the program's interpreter (one "serve" sandbox per test)
and comes back as plain data, or as a `ProgramObject` handle that can only be called, indexed,
iterated or have an attribute read, each of which again goes to the program. So every comparison,
`abs`, `all`, `sorted` and `assert` of a test runs here on values decoded by this interpreter: an
object whose `==` is always true, a patched builtin or a forged marker has nothing to act on. A
handle that is compared, hashed or tested for truth raises TypeError, which fails the test.

Builtins always mean this interpreter's builtins, even where the program defines a function of the
same name. The program's arguments arrive as copies; lists, dicts and sets it changed in place are
copied back after the call. Shipped into the sandbox as a code object (see sandbox_child.py).
"""

import builtins
import sys

from rewards.sandbox_child import send
from rewards.sandbox_wire import decode, encode, loads

_EXITS = ("SystemExit", "KeyboardInterrupt", "GeneratorExit")
_PLAIN = "None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset, Decimal, Fraction"


class ProgramEnded(BaseException):
    """The program's process is gone (crashed, exited, timed out): the test fails, whatever it catches."""


class ProgramError(Exception):
    """The program raised an exception that is not a builtin one (named in the message)."""


class Channel:
    """Requests to the program of the current test, through the parent; `generation` counts tests, so a
    handle kept from an earlier test is refused."""

    def __init__(self, cfg: dict):
        self.cfg, self.generation, self.ended = cfg, 0, None
        self._replies = open(cfg["in_fd"], "rb", buffering=1 << 16)

    def exchange(self, message: dict) -> dict:
        send(self.cfg, message)
        line = self._replies.readline()
        if not line:
            raise SystemExit(1)  # the parent hung up: nothing left to judge
        try:
            return loads(line)
        except ValueError as e:
            return {"ended": f"unreadable reply: {e}"}

    def request(self, op: str, **fields) -> object:
        if self.ended is not None:
            raise ProgramEnded(self.ended)
        return self._result(self.exchange({"op": op, **fields}))

    def call(self, target: "ProgramObject", args: tuple, kwargs: dict) -> object:
        encoded_args = [encode(a, self._ref) for a in args]
        encoded_kwargs = [[k, encode(v, self._ref)] for k, v in kwargs.items()]
        if self.ended is not None:
            raise ProgramEnded(self.ended)
        reply = self.exchange({"op": "call", "target": self._ref(target), "args": encoded_args,
                               "kwargs": encoded_kwargs})
        value = self._result(reply)
        self._unless_malformed(lambda: _copy_back(reply, args, kwargs, self._handle))
        return value

    def _result(self, reply: dict) -> object:
        if "ended" in reply:
            self.ended = str(reply["ended"])
            raise ProgramEnded(self.ended)
        if "raise" in reply:
            error = _exception(reply["raise"])
            if isinstance(error, ProgramEnded):
                self.ended = str(error)
            raise error
        return self._unless_malformed(lambda: decode(reply["value"], self._handle))

    def _unless_malformed(self, read) -> object:
        """read(); a reply it cannot read ends the program's run (ProgramEnded)."""
        try:
            return read()
        except (KeyError, ValueError, TypeError, RecursionError, MemoryError) as e:
            self.ended = f"the program's reply is not plain data ({type(e).__name__}: {e})"
            raise ProgramEnded(self.ended) from None

    def _handle(self, tag: dict) -> "ProgramObject":
        if "handle" not in tag or type(tag.get("type", "")) is not str:
            raise ValueError(f"not a handle: {tag}")
        return ProgramObject(self, tag["handle"], tag.get("type", "object")[:100])

    def _ref(self, value: object) -> dict:
        if type(value) is ProgramObject and value._channel is self and value._generation == self.generation:
            return {"ref": value._id}
        if type(value) is ProgramObject:
            raise TypeError("a program object from an earlier test cannot be passed to this test's program")
        raise TypeError(f"cannot pass a {type(value).__name__} to the program: only plain data ({_PLAIN}) and "
                        "the program's own objects")


def _copy_back(reply: dict, args: tuple, kwargs: dict, resolve) -> None:
    for index, value in reply.get("mutated", []):
        if type(index) is int and 0 <= index < len(args):
            _update_in_place(args[index], decode(value, resolve))
    for name, value in reply.get("mutated_kwargs", []):
        if name in kwargs:
            _update_in_place(kwargs[name], decode(value, resolve))


def _update_in_place(old: object, new: object) -> bool:
    """Make container `old` hold what `new` holds, keeping `old`'s identity (and its inner containers')."""
    if type(old) is list and type(new) is list:
        for i in range(min(len(old), len(new))):
            if not _update_in_place(old[i], new[i]):
                old[i] = new[i]
        del old[len(new):]
        old.extend(new[len(old):])
        return True
    if type(old) is dict and type(new) is dict:
        for key in [k for k in old if k not in new]:
            del old[key]
        for key, value in new.items():
            if key not in old or not _update_in_place(old[key], value):
                old[key] = value
        return True
    if type(old) is set and type(new) is set:
        old.clear()
        old.update(new)
        return True
    return False


def _exception(raised: object) -> BaseException:
    """The program's exception, as this interpreter's builtin of that name where there is one."""
    if type(raised) is not dict:
        return ProgramError(f"unreadable exception {raised!r:.100}")
    name, message = str(raised.get("type", "Exception"))[:100], str(raised.get("message", ""))[:2000]
    if name in _EXITS:  # it ends `python solution.py`, so it ends the program's run here too
        return ProgramEnded(f"{name}: {message}")
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:
            pass
    return ProgramError(f"{name}: {message}")


class ProgramObject:
    """An object that lives in the program's interpreter. Only calls, attribute reads, indexing and
    iteration reach it; the rest raises TypeError, for nothing the program computes may decide a test."""

    __slots__ = ("_channel", "_id", "_type", "_generation")

    def __init__(self, channel: Channel, handle: int, type_name: str):
        self._channel, self._id, self._type = channel, handle, type_name
        self._generation = channel.generation

    def __call__(self, *args, **kwargs):
        return self._channel.call(self, args, kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # protocol probes (copy, pickle, ...) must not reach the program
        return self._channel.request("getattr", target=self._channel._ref(self), name=name)

    def __getitem__(self, key):
        return self._channel.request("getitem", target=self._channel._ref(self), key=encode(key, self._channel._ref))

    def __iter__(self):
        return self._channel.request("iter", target=self._channel._ref(self))

    def __next__(self):
        return self._channel.request("next", target=self._channel._ref(self))

    def __repr__(self) -> str:
        return f"<{self._type} object of the program>"

    def _refuse(self, *args):
        raise TypeError(f"the program returned a {self._type} object, not plain data; a test can only compare "
                        f"plain data ({_PLAIN})")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __len__ = __contains__ = __hash__ = _refuse
    __index__ = __int__ = __float__ = __complex__ = _refuse


class _ProgramNames(dict):
    """The tests' builtins: this interpreter's, then the program's names (a dict subclass's __missing__ is
    consulted by both LOAD_NAME and LOAD_GLOBAL once the builtins are not an exact dict)."""

    def __init__(self, channel: Channel):
        super().__init__(builtins.__dict__)
        self._channel = channel

    def __missing__(self, name: str) -> object:
        value = self._channel.request("load", name=name)
        if type(value) is ProgramObject:
            self[name] = value  # a function or class: look it up once per test
        return value


def run_judge(cfg: dict) -> int:
    """Judge every test in cfg["tests"]: {"run": i}, the test's requests, then {"done": i, "passed": ...}."""
    channel = Channel(cfg)
    for i, test in enumerate(cfg["tests"]):
        channel.generation, channel.ended = i, None
        reply = channel.exchange({"run": i})
        if "ended" in reply:
            send(cfg, {"done": i, "passed": False, "error": f"the program ended: {reply['ended']}"})
            continue
        passed, error = _run_test(test, i, channel)
        send(cfg, {"done": i, "passed": passed and channel.ended is None, "error": error})
    return 0


def _run_test(test: str, index: int, channel: Channel) -> tuple[bool, str | None]:
    namespace = {"__name__": "__main__", "__builtins__": _ProgramNames(channel)}
    try:
        exec(compile(test, f"test_{index}.py", "exec"), namespace)
        return True, None
    except BaseException as e:  # a test's failure, whatever its kind
        line = next((tb.tb_lineno for tb in _frames(e.__traceback__) if tb.tb_frame.f_code.co_filename
                     == f"test_{index}.py"), None)
        return False, f"{type(e).__name__} at line {line}: {_text(e)}"[:2000]
    finally:
        sys.stdout.flush()


def _frames(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def _text(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:
        return "?"
