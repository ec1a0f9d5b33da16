"""Finding recipes and composing them with Hydra into a checked, frozen RLConfig."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from importlib import resources
from pathlib import Path

import yaml

from rlcore import config as config_module
from rlcore.config import RLConfig, register_schema
from rlcore.overrides import UnknownKey, check_overrides, is_known, nearest_key


class ConfigError(ValueError):
    """A recipe, override or setting the run cannot use; the message names the key."""


def recipes_dir() -> Path:
    """The built-in recipes folder (shipped in the wheel as the `recipes` package data)."""
    return Path(str(resources.files("recipes")))


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def find_recipe(name_or_path: str | None) -> Path:
    """A path to a YAML file, or the name of a built-in recipe; none = the quickstart."""
    name_or_path = name_or_path or "quickstart"
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {name_or_path!r} does not exist")
        return path.resolve()
    builtin = recipes_dir() / f"{name_or_path}.yaml"
    if not builtin.is_file():
        raise ConfigError(f"unknown recipe {name_or_path!r}; built-in recipes: {builtin_recipes()}")
    return builtin


def compose(recipe: str | None, overrides: list[str]) -> tuple[RLConfig, Path]:
    """Recipe + key=value overrides -> RLConfig. Unknown keys and wrong types fail here."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    path = find_recipe(recipe)
    _check_defaults(path)
    try:
        overrides = check_overrides(list(overrides))
    except UnknownKey as e:
        raise ConfigError(str(e)) from None
    register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            # Built-in recipes are on the search path, so a recipe of your own may start from one
            # (defaults: [gspo_arith, _self_]); its own folder comes first.
            search = f"hydra.searchpath=[file://{recipes_dir()}]"
            cfg = hydra_compose(config_name=path.stem, overrides=[*overrides, search])
        obj = OmegaConf.to_object(cfg)
    except Exception as e:  # Hydra/OmegaConf raise many types; all mean "this config is wrong"
        raise ConfigError(f"recipe {str(path)!r} with overrides {list(overrides)}:\n{_clean(e)}") from None
    finally:
        GlobalHydra.instance().clear()
    return obj, path


def _check_defaults(path: Path) -> None:
    # Without the schema in its defaults list Hydra would accept any key silently.
    try:
        body = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {e}") from None
    defaults = body.get("defaults") if isinstance(body, dict) else None
    if not defaults:
        raise ConfigError(
            f"recipe {str(path)!r} has no defaults list; start it with\n"
            "defaults:\n  - rlcore   # the schema: every key and type is checked\n  - _self_"
        )


def _clean(e: Exception) -> str:
    # Hydra chains the useful OmegaConf message (with full_key) as the cause.
    msgs = []
    while e is not None:
        text = str(e).strip()
        if text and text not in msgs:
            msgs.append(text)
        e = e.__cause__ or e.__context__
    # Hydra suggests `+key=value` for an unknown key; that form would skip the schema. Suggest the
    # nearest valid key instead (a typo in the recipe file itself lands here).
    lines = list(dict.fromkeys(line for m in msgs for line in m.splitlines()
                               if not line.startswith("To append to your config")))
    keys = [line.split("full_key:", 1)[1].strip().replace("[", ".").replace("]", "") for line in lines
            if "full_key:" in line]
    hint = nearest_key(keys[0]) if keys and not is_known(keys[0]) else None
    if hint:
        lines.append(f"did you mean {hint}?")
    return "\n".join(lines)


def to_yaml(cfg: RLConfig) -> str:
    """The fully resolved config as YAML (saved in every run folder)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def field_docs() -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every leaf of the schema, from attribute docstrings."""
    docs = _attribute_docstrings()
    out: list[tuple[str, str, str]] = []

    def walk(cls, prefix: str):
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default), key + ".")
            else:
                out.append((key, repr(default), docs.get((cls.__name__, f.name), "")))

    walk(RLConfig, "")
    return out


def _attribute_docstrings() -> dict[tuple[str, str], str]:
    tree = ast.parse(inspect.getsource(config_module))
    docs = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        body = node.body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[(node.name, a.target.id)] = " ".join(str(b.value.value).split())
    return docs
