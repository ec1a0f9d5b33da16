"""Model-based reward terms, `orm` and `prm`: scored in the trainer's process on its device.

Unlike rule rewards (one call per sample in a worker process), a model term scores the whole batch
in one go, since batching is what makes a reward model affordable. A model term that raises stops
the run: its failures are bugs or out-of-memory, not per-sample accidents, and zeros from a broken
reward model would train the policy on nothing.

Term arguments (reward.terms[i].args):
    orm: path, plus OutcomeRewardModel's keywords (normalize, batch_size, apply_chat_template, ...)
    prm: path, convention (qwen | shepherd), aggregate (min | last | mean | product; default min),
         dense (default false), plus ProcessRewardModel's keywords (separator, step_token, ...).
         dense=false: the term scores aggregate(step scores) like any outcome reward.
         dense=true: the step scores become token rewards (the trainer places each on its step's last
         token for GAE, or turns them into GRPO process advantages); the term adds nothing to the
         sample's scalar score and is logged as the mean of its step scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MODEL_REWARDS = ("orm", "prm")


@dataclass(frozen=True)
class TermOutput:
    scores: list[float]
    """(B,) the sample's score (prm: its step scores aggregated)."""
    step_scores: list[list[float]] | None = None
    """prm only: per sample, per step, in [0, 1]."""
    char_ends: list[list[int]] | None = None
    """prm only: per sample, per step, the step's end offset in the response text."""


class ORMTerm:
    dense = False

    def __init__(self, *, path: str, device: str = "cpu", **kwargs: Any):
        from rewards.orm import OutcomeRewardModel

        self.model = OutcomeRewardModel(path, device=device, **kwargs)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> TermOutput:
        return TermOutput(scores=[float(s) for s in self.model(list(prompts), list(responses))])


class PRMTerm:
    def __init__(self, *, path: str, aggregate: str = "min", dense: bool = False, device: str = "cpu",
                 **kwargs: Any):
        from rewards.prm import AGGREGATIONS, ProcessRewardModel

        if aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate={aggregate!r}; expected one of {sorted(AGGREGATIONS)}")
        if not isinstance(dense, bool):
            raise TypeError(f"dense={dense!r}; expected true or false")
        self.how, self.dense = aggregate, dense
        self.model = ProcessRewardModel(path, device=device, **kwargs)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> TermOutput:
        from rewards.prm import aggregate

        steps = self.model.score_steps(list(prompts), list(responses))
        if self.dense:  # logged as the mean step score; contributes through the token rewards only
            scores = [sum(s) / len(s) if s else 0.0 for s in steps.scores]
        else:
            scores = [aggregate(s, self.how) for s in steps.scores]
        return TermOutput(scores=scores, step_scores=steps.scores, char_ends=steps.char_ends)


def build_model_term(name: str, kwargs: Mapping[str, Any], *, device: str) -> ORMTerm | PRMTerm:
    """The term for `name` in MODEL_REWARDS, its model loaded; errors say which argument is wrong."""
    if "path" not in kwargs:
        raise ValueError(f"{name}: args.path is required: a local Hugging Face checkpoint folder of the reward model")
    cls = {"orm": ORMTerm, "prm": PRMTerm}[name]
    try:
        return cls(device=device, **kwargs)
    except TypeError as e:
        raise TypeError(f"{name}: bad args {dict(kwargs)!r}: {e}") from None


def step_metrics(key: str, step_scores: list[list[float]]) -> dict[str, float]:
    """Step-level statistics of a PRM term, for TensorBoard under reward/<key>/."""
    flat = [s for steps in step_scores for s in steps]
    n = len(step_scores)
    mean = sum(flat) / len(flat) if flat else 0.0
    std = (sum((s - mean) ** 2 for s in flat) / (len(flat) - 1)) ** 0.5 if len(flat) > 1 else 0.0
    with_steps = [steps for steps in step_scores if steps]
    return {
        f"reward/{key}/step_mean": mean,
        f"reward/{key}/step_std": std,
        f"reward/{key}/steps_per_sample": len(flat) / n if n else 0.0,
        f"reward/{key}/min_step_mean": sum(map(min, with_steps)) / len(with_steps) if with_steps else 0.0,
        f"reward/{key}/last_step_mean": sum(s[-1] for s in with_steps) / len(with_steps) if with_steps else 0.0,
        f"reward/{key}/no_step_samples": float(n - len(with_steps)),
    }
