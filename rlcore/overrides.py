"""Every `key=value` override is checked against the schema before Hydra sees it.

Hydra's `+key=value` appends a key the config does not have, which skips the schema: with a
structured config the new key was silently dropped when the config became dataclasses (issue 13).
Every key here exists in the schema, so `+` is never needed: an override of a schema key has its
`+`/`++` removed, an unknown key fails with the nearest valid key, and only keys beneath a free-form
mapping (`reward.terms.0.args.<name>`) are handed to Hydra as add-or-override (`++`).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing

from rlcore.config import RLConfig


class UnknownKey(ValueError):
    """An override names a key the schema does not have; the message suggests the nearest one."""


def check_overrides(overrides: list[str]) -> list[str]:
    """The overrides as Hydra should get them; raises UnknownKey naming the first unknown key."""
    out = []
    for text in overrides:
        prefix, key, rest = _split(text)
        kind = _resolve(RLConfig, key.split("."))
        if kind == "unknown":
            hint = nearest_key(key)
            raise UnknownKey(f"override {text!r}: unknown key {key!r}"
                             + (f"; did you mean {hint}?" if hint else "")
                             + " (`rlcore train --help` lists every key)")
        if prefix == "~":
            out.append(text)
        elif kind == "free":  # a new entry of a free-form mapping is fine: add or override it
            out.append(f"++{key}{rest}")
        else:
            out.append(f"{key}{rest}")
    return out


def _split(text: str) -> tuple[str, str, str]:
    """'+a.b=1' -> ('+', 'a.b', '=1')."""
    stripped = text.lstrip("+~")
    prefix = text[: len(text) - len(stripped)]
    key, eq, value = stripped.partition("=")
    return prefix, key.strip(), eq + value


def is_known(key: str) -> bool:
    """True when the dotted key is a section or field of the schema (or lies in a free-form mapping)."""
    return _resolve(RLConfig, key.split(".")) != "unknown"


def _resolve(cls, parts: list[str]) -> str:
    """'schema' (a field or section), 'free' (beneath a free-form mapping) or 'unknown'."""
    hints = typing.get_type_hints(cls)
    if not parts or parts[0] not in hints:
        return "unknown"
    kind, rest = hints[parts[0]], parts[1:]
    if not rest:
        return "schema"
    if dataclasses.is_dataclass(kind):
        return _resolve(kind, rest)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is dict:
        return "free"
    if origin is list and rest[0].isdigit():  # reward.terms.0.weight
        item = args[0] if args else None
        if len(rest) == 1:
            return "schema"
        return _resolve(item, rest[1:]) if dataclasses.is_dataclass(item) else "unknown"
    return "unknown"  # nothing lies beneath a plain value


def schema_keys() -> list[str]:
    """Every dotted key of the schema: sections and leaves."""
    keys: list[str] = []

    def walk(cls, prefix: str) -> None:
        for name, kind in typing.get_type_hints(cls).items():
            if name.startswith("_"):
                continue
            keys.append(prefix + name)
            if dataclasses.is_dataclass(kind):
                walk(kind, f"{prefix}{name}.")

    walk(RLConfig, "")
    return keys


def nearest_key(key: str) -> str | None:
    """The valid key a typo most likely meant: the same field name in another section
    (train.total_steps -> trainer.total_steps), a close or abbreviated name in the same section
    (train.learning_rate -> train.lr), else the closest key overall; None when nothing is close."""
    keys = schema_keys()
    parent, _, leaf = key.rpartition(".")
    same_leaf = [k for k in keys if k.rpartition(".")[2] == leaf]
    if same_leaf:
        return min(same_leaf, key=lambda k: -difflib.SequenceMatcher(None, k, key).ratio())
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
    for name, full in siblings.items():
        if _initials(leaf) == name or _initials(name) == leaf:
            return full
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if close:
        return siblings[close[0]]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return close[0] if close else None


def _initials(name: str) -> str:
    """learning_rate -> lr: abbreviations are the typo difflib cannot see."""
    words = [w for w in name.split("_") if w]
    return "".join(w[0] for w in words) if len(words) > 1 else name
