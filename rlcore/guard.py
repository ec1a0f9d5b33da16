"""Non-finite updates never reach the weights, and non-finite weights never reach a file.

A loss or gradient norm that is NaN or inf (a learning rate far too high, an overflow) used to be
applied: every weight became NaN, that checkpoint was saved as valid, and the next rollout crashed
inside sampling. Now such an optimizer step is skipped (actor and critic, counted in
`actor/skipped_steps` / `critic/skipped_steps`), a few in a row stop the run with the step and the last
finite values, and checkpoints and exports check the weights before they are written.
"""

from __future__ import annotations

import math

import torch

from rlcore import dist


class NonFiniteError(RuntimeError):
    """Updates kept being non-finite, or weights about to be saved are: the run stops."""


class UpdateGuard:
    """Decides, the same way on every rank, whether an optimizer step may be applied.

    `rl_step` is set by the trainer before each RL step so the stop message names it. With FSDP the
    gradient norm from clip_grad_norm_ is already global, but the loss is this rank's part: the
    verdict is all-reduced, so every rank skips the same steps and the shards stay in lockstep.
    """

    def __init__(self, who: str, max_consecutive: int):
        self.who, self.max_consecutive = who, max_consecutive
        self.rl_step = 0
        self.consecutive = 0
        self.last_finite: tuple[int, float, float] | None = None  # (RL step, loss, grad norm)

    def should_skip(self, loss: float, grad_norm: float) -> bool:
        """True when this step's update must not be applied; raises NonFiniteError after
        `max_consecutive` such steps in a row (0 = never)."""
        is_bad = dist.any_rank(not (math.isfinite(loss) and math.isfinite(grad_norm)))
        if not is_bad:
            self.consecutive = 0
            self.last_finite = (self.rl_step, loss, grad_norm)
            return False
        self.consecutive += 1
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteError(self._message(loss, grad_norm))
        return True

    def _message(self, loss: float, grad_norm: float) -> str:
        if self.last_finite is None:
            last = "no update since the run (re)started was finite"
        else:
            step, last_loss, last_norm = self.last_finite
            last = f"the last finite one was at RL step {step} (loss {last_loss:.6g}, grad norm {last_norm:.6g})"
        lr_key = "critic.lr" if self.who == "critic" else "train.lr"
        return (f"stopped at RL step {self.rl_step}: {self.consecutive} {self.who} updates in a row had a non-finite "
                f"loss or gradient norm (now loss {loss}, grad norm {grad_norm}; on this rank); {last}. They were "
                f"skipped, so the weights and checkpoints are finite. Lower {lr_key} or set train.max_grad_norm, "
                "then resume (trainer.resume=auto); train.max_nonfinite_updates sets how many in a row stop the run")


def first_nonfinite_parameter(*modules) -> str | None:
    """The name of the first parameter of `modules` holding a NaN or inf on this rank (a sharded
    parameter: its local shard), or None."""
    for module in modules:
        if module is None:
            continue
        for name, p in module.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if not bool(torch.isfinite(local.detach()).all()):
                return name
    return None


def check_finite_weights(what: str, *modules) -> None:
    """Raise NonFiniteError (on every rank alike) when any rank holds a non-finite parameter."""
    name = first_nonfinite_parameter(*modules)
    if dist.any_rank(name is not None):
        where = f"parameter {name!r}" if name is not None else "a parameter on another rank"
        raise NonFiniteError(f"refusing to write {what}: {where} is NaN or inf. The run diverged; resume from an "
                             "earlier checkpoint with a lower learning rate")


class RewardTermFailed(RuntimeError):
    """A reward term failed on every sample, step after step: the run was training on nothing."""


class RewardTermWatch:
    """Stops the run when a reward term fails (raises, returns a non-number, times out) on every
    sample of `max_steps` consecutive steps (0 = never). A reward failing on some samples costs those
    samples their reward and the run goes on; failing on all of them, the term contributes only zeros,
    and a run whose only term that is would train on nothing and still exit 0.

    It reads the step's metrics after they are reduced over the ranks (reward/<key>/errors and
    /timeouts against reward/samples), so every rank stops at the same step.
    """

    def __init__(self, keys: list[str], max_steps: int):
        self.max_steps = max_steps
        self.in_a_row = dict.fromkeys(keys, 0)

    def observe(self, step: int, metrics: dict[str, float], errors: dict[str, str]) -> None:
        """Count this step; raise RewardTermFailed (with the term's first error) at the limit."""
        samples = metrics.get("reward/samples", 0.0)
        for i, key in enumerate(self.in_a_row):
            failed = metrics.get(f"reward/{key}/errors", 0.0) + metrics.get(f"reward/{key}/timeouts", 0.0)
            self.in_a_row[key] = self.in_a_row[key] + 1 if samples and failed >= samples else 0
            if self.max_steps and self.in_a_row[key] >= self.max_steps:
                error = errors.get(key) or "(the error was raised on another rank)"
                raise RewardTermFailed(
                    f"stopped at RL step {step}: reward term {key!r} (reward.terms[{i}]) failed on every sample for "
                    f"{self.in_a_row[key]} steps in a row, so it scored nothing; its error: {error}. Fix the "
                    "reward function (or raise reward.timeout_s if it only timed out); reward.max_failed_steps "
                    "sets how many such steps stop the run (0 = never)")
