"""Reward registry: name -> fn(prompt, response, row, **kwargs) -> float.

Built-ins register themselves on import of the `rewards` package; user code is named
`python:path/to/file.py:fn` and loaded from that file (see `rewards.user`).
"""

from collections.abc import Callable

from rewards.user import USER_PREFIX, load_user_fn

RewardFn = Callable[..., float]

REWARDS: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding `fn` to REWARDS under `name`; a second use of a name raises."""

    def decorator(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            old = REWARDS[name]
            raise ValueError(f"reward {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        REWARDS[name] = fn
        return fn

    return decorator


def resolve_reward(name: str) -> RewardFn:
    """The reward function for a registry name or a `python:path/to/file.py:fn` name."""
    if name.startswith(USER_PREFIX):
        return load_user_fn(name)
    if name not in REWARDS:
        from rewards.model_terms import MODEL_REWARDS

        valid = ", ".join(sorted([*REWARDS, *MODEL_REWARDS]))
        raise ValueError(f"unknown reward {name!r}; valid names: {valid}, or {USER_PREFIX}path/to/file.py:fn")
    return REWARDS[name]
