"""Registries: one plain dict per axis that a recipe picks from by name (STYLE.md §4.4-4.5).

The trainer dispatches through these tables and never branches on a name, so every entry of a
table shares one calling convention:

    ADVANTAGES[name](scores=..., group_ids=..., mask=..., **kwargs) -> advantages (B, T)
    POLICY_LOSSES[name](logprobs=..., old_logprobs=..., advantages=..., mask=..., **kwargs)
        -> (loss scalar, metrics dict[str, float])
    KL_ESTIMATORS[name](logprobs, ref_logprobs) -> per-token KL (B, T)
    AGGREGATIONS[name](loss_mat, mask, *, num_tokens=None, num_seqs=None, norm_len=None) -> scalar

No entry points, factories or plugin discovery: a new estimator is a decorated function in one of
the `algos/` modules, and `algos/__init__.py` imports every module so the tables are full once
`algos` is imported.
"""

from typing import Callable

ADVANTAGES: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}
KL_ESTIMATORS: dict[str, Callable] = {}
AGGREGATIONS: dict[str, Callable] = {}


def register(table: dict[str, Callable], name: str) -> Callable[[Callable], Callable]:
    """Decorator adding `fn` to `table` under `name`; a duplicate name raises ValueError.

    Raising (rather than overwriting, as verl's policy-loss registry does) keeps two modules from
    silently fighting over one recipe name.
    """

    def decorator(fn: Callable) -> Callable:
        if name in table:
            raise ValueError(f"{name!r} is already registered (to {table[name].__qualname__})")
        table[name] = fn
        return fn

    return decorator


def lookup(table: dict[str, Callable], name: str, axis: str) -> Callable:
    """Return `table[name]`; an unknown name raises KeyError naming the axis and the valid keys."""
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"unknown {axis} {name!r}; valid: {sorted(table)}") from None
