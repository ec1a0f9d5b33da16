"""Rewards: registry of reward functions and their weighted, time-limited composition.

A reward is fn(prompt: str, response: str, row: Mapping[str, Any], **kwargs) -> float,
where row is the dataset row (gold answers etc.). Built-ins: exact, format, math; user code
is named python:path/to/file.py:fn. This package must not import rlcore (rlcore imports it).
"""

from rewards import code, math_reward, rule  # noqa: F401  (import registers the built-ins)
from rewards.composite import CompositeReward, PendingReward, RewardResult, RewardSpec
from rewards.registry import REWARDS, RewardFn, register, resolve_reward

__all__ = ["REWARDS", "CompositeReward", "PendingReward", "RewardFn", "RewardResult", "RewardSpec", "register",
           "resolve_reward"]
