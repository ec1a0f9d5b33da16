"""Load user reward functions named `python:path/to/file.py:fn`.

The path is relative to the current working directory, or absolute. Each file is imported
once per process, under a private module name that is also put in sys.modules (dataclasses
and pickle look classes up there).
"""

import hashlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

USER_PREFIX = "python:"

_MODULES: dict[Path, ModuleType] = {}


def split_user_name(name: str) -> tuple[Path, str]:
    """`python:path/to/file.py:fn` -> (absolute path, fn name). The file need not exist."""
    path, sep, fn_name = name.removeprefix(USER_PREFIX).rpartition(":")
    if not sep or not path or not fn_name:
        raise ValueError(f"bad user reward name {name!r}; expected {USER_PREFIX}path/to/file.py:fn")
    return Path(path).expanduser().resolve(), fn_name


def canonical_user_name(name: str) -> str:
    """The same name with an absolute path, so workers find the file whatever their cwd."""
    path, fn_name = split_user_name(name)
    return f"{USER_PREFIX}{path}:{fn_name}"


def load_user_fn(name: str, *, what: str = "reward", key: str = "reward[i].name") -> Callable[..., float]:
    """Import the file named in `name` (once per process) and return its function. `what` and `key`
    word the errors (a tool file is named by rollout.tools[i].name)."""
    path, fn_name = split_user_name(name)
    given = name.removeprefix(USER_PREFIX).rpartition(":")[0]
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} file {given!r} not found (looked for {path}); fix the {key} key: "
            f"{USER_PREFIX}path/to/file.py:fn, path relative to the working directory {Path.cwd()} or absolute"
        )
    module = _MODULES.get(path) or _import_file(path, what)
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise AttributeError(f"{what} file {path} has no function {fn_name!r}; fix the {key} key")
    if not callable(fn):
        raise TypeError(f"{fn_name!r} in {what} file {path} is not callable ({type(fn).__name__})")
    return fn


def _import_file(path: Path, what: str = "reward") -> ModuleType:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"_rewards_user_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import reward file {path} (not a Python source file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[module_name]
        e.add_note(f"while importing {what} file {path}")
        raise
    _MODULES[path] = module
    return module
