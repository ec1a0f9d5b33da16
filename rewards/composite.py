"""Weighted sum of rewards: rule rewards in worker processes with a time limit per call, model rewards
(`orm`, `prm`) in this process, batch by batch (see rewards.model_terms)."""

import inspect
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rewards.model_terms import MODEL_REWARDS, build_model_term, step_metrics
from rewards.pool import WorkerPool
from rewards.registry import resolve_reward
from rewards.user import USER_PREFIX, canonical_user_name

logger = logging.getLogger(__name__)

RewardSpec = tuple[str, float, Mapping[str, Any]]
"""(name, weight, kwargs) — one `reward[i]` entry of the config."""


@dataclass(frozen=True)
class RewardResult:
    """Scores for a batch of B samples.

    scores: (B,) sum over components of weight * component score.
    components: component key -> (B,) unweighted scores; key = reward name (file.fn for a
    python: reward), or
        name_<i> for the i-th spec when an earlier spec has the same name.
    metrics: reward/<key>/mean, reward/<key>/errors, reward/<key>/timeouts (sample counts); for a
    prm term also its step statistics (reward/<key>/step_mean, ...).
    step_scores / step_char_ends: with a dense prm term, per sample and step, the step score times
    the term's weight and the step's end offset in the response text; None otherwise. A dense term
    adds nothing to `scores`.
    first_errors: component key -> the first error (or timeout) message of this batch, for the keys
    that had one.
    """

    scores: list[float]
    components: dict[str, list[float]]
    metrics: dict[str, float]
    step_scores: list[list[float]] | None = None
    step_char_ends: list[list[int]] | None = None
    first_errors: dict[str, str] = field(default_factory=dict)


class CompositeReward:
    """Scores (prompt, response, row) batches with a weighted sum of rewards.

    Construction resolves every name and checks its kwargs (and runs a reward's `preflight(**kwargs)`
    if it has one: `code` checks the machine's sandbox), so a bad config fails before training,
    naming the spec as reward[i]. A call that raises, returns a non-finite value,
    or runs past `timeout_s` scores 0.0 and is counted, never raised (calls raise only on
    mismatched lengths or a worker that cannot start). `keys` / `weights` follow spec order.
    Workers start in the constructor (spawned, ~0.2 s; ~1.3 s with `math`, which imports
    Math-Verify) and live until `close()` or the end of a `with` block. Model terms (`orm`, `prm`)
    load their model in the constructor, on `device`; at most one prm term may be dense.
    """

    def __init__(self, specs: Sequence[RewardSpec], *, timeout_s: float = 10.0, num_workers: int = 2,
                 device: str = "cpu"):
        if not specs:
            raise ValueError("reward: no reward specs; set reward: [{name: ..., weight: ...}]")
        if not timeout_s > 0:
            raise ValueError(f"reward timeout_s must be > 0, got {timeout_s}")
        if num_workers < 1:
            raise ValueError(f"reward num_workers must be >= 1, got {num_workers}")
        worker_names, self.weights, kwargs_list, self.keys = [], [], [], []
        self._rule_terms: list[int] = []  # spec index of each worker-pool reward, in pool order
        self._model_terms: dict[int, Any] = {}  # spec index -> ORMTerm / PRMTerm
        for i, spec in enumerate(specs):
            name, weight, kwargs = _check_spec(i, spec)
            self.weights.append(weight)
            # python:dir/file.py:fn logs as file.fn: a path makes an unreadable TensorBoard tag.
            short = _short_name(name)
            self.keys.append(f"{short}_{i}" if short in map(_short_name, [s[0] for s in specs[:i]]) else short)
            if name in MODEL_REWARDS:
                try:
                    self._model_terms[i] = build_model_term(name, kwargs, device=device)
                except Exception as e:
                    raise _indexed(e, i) from e
                continue
            self._rule_terms.append(i)
            worker_names.append(canonical_user_name(name) if name.startswith(USER_PREFIX) else name)
            kwargs_list.append(kwargs)
        dense = [i for i, term in self._model_terms.items() if term.dense]
        if len(dense) > 1:
            raise ValueError(f"reward[{dense[1]}]: only one prm term may be dense (reward[{dense[0]}] is too)")
        self._dense = dense[0] if dense else None
        self._pool = WorkerPool(worker_names, kwargs_list, num_workers=num_workers, timeout_s=timeout_s) \
            if worker_names else None
        self._thread: ThreadPoolExecutor | None = None  # feeds the pool for submit(), started on first use

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], rows: Sequence[Mapping[str, Any]]
    ) -> RewardResult:
        return self.submit(prompts, responses, rows).result()

    def submit(
        self, prompts: Sequence[str], responses: Sequence[str], rows: Sequence[Mapping[str, Any]]
    ) -> "PendingReward":
        """Start scoring: the rule rewards run in the worker processes while the caller goes on (e.g.
        with model forwards); `.result()` waits for them, then runs the model terms in the caller's
        thread (they share its device) and returns what `__call__` returns. Several batches may be
        submitted: the workers score them one after another, in submit order."""
        n = len(responses)
        if len(prompts) != n or len(rows) != n:
            raise ValueError(f"got {len(prompts)} prompts, {n} responses, {len(rows)} rows; need one each per sample")
        num_rules = len(self._rule_terms)
        # One task per (sample, rule reward): a slow reward on one sample delays nothing else.
        tasks = [(c, prompts[i], responses[i], rows[i]) for i in range(n) for c in range(num_rules)]
        start = time.perf_counter()

        def run_rules() -> tuple[list, float]:
            outcomes = self._pool.run(tasks) if self._pool is not None else []
            return outcomes, time.perf_counter() - start

        if self._pool is None:
            future: Future = Future()
            future.set_result(run_rules())
        else:
            if self._thread is None:
                self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
            future = self._thread.submit(run_rules)
        return PendingReward(future, lambda outcomes: self._assemble(prompts, responses, outcomes))

    def _assemble(self, prompts: Sequence[str], responses: Sequence[str], outcomes: list) -> RewardResult:
        n, num_rules = len(responses), len(self._rule_terms)
        components = {key: [0.0] * n for key in self.keys}
        errors = {key: [] for key in self.keys}
        timeouts = dict.fromkeys(self.keys, 0)
        first_errors: dict[str, str] = {}
        for t, (value, error, timed_out) in enumerate(outcomes):
            i, c = divmod(t, num_rules)
            key = self.keys[self._rule_terms[c]]
            components[key][i] = value
            if error is not None:
                first_errors.setdefault(key, error)
            if timed_out:
                timeouts[key] += 1
            elif error is not None:
                errors[key].append(error)

        metrics, steps = {}, None
        for c, term in self._model_terms.items():
            out = term(prompts, responses)
            if len(out.scores) != n:
                raise RuntimeError(f"reward[{c}] ({self.keys[c]}) returned {len(out.scores)} scores for {n} samples")
            components[self.keys[c]] = out.scores
            if out.step_scores is not None:
                metrics |= step_metrics(self.keys[c], out.step_scores)
            if c == self._dense:
                steps = ([[self.weights[c] * v for v in s] for s in out.step_scores], out.char_ends)
        for key in self.keys:
            metrics[f"reward/{key}/mean"] = sum(components[key]) / n if n else 0.0
            metrics[f"reward/{key}/errors"] = float(len(errors[key]))
            metrics[f"reward/{key}/timeouts"] = float(timeouts[key])
            if errors[key] or timeouts[key]:
                logger.warning(
                    "reward %s: %d of %d samples raised, %d timed out (scored 0); first error: %s",
                    key, len(errors[key]), n, timeouts[key], errors[key][0] if errors[key] else "-",
                )
        outcome_terms = [(key, w) for c, (key, w) in enumerate(zip(self.keys, self.weights)) if c != self._dense]
        scores = [sum(w * components[key][i] for key, w in outcome_terms) for i in range(n)]
        return RewardResult(scores=scores, components=components, metrics=metrics,
                            step_scores=steps[0] if steps else None, step_char_ends=steps[1] if steps else None,
                            first_errors=first_errors)

    @property
    def is_dense(self) -> bool:
        """True when a prm term gives step rewards (RewardResult.step_scores is filled)."""
        return self._dense is not None

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> "CompositeReward":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PendingReward:
    """A submitted batch: `result()` waits for it (once; later calls return the same result).
    `rule_seconds`: wall time from submit until the rule rewards were done (known after result())."""

    def __init__(self, rules: Future, assemble: Callable[[list], RewardResult]):
        self._rules, self._assemble = rules, assemble
        self._result: RewardResult | None = None
        self.rule_seconds = 0.0

    def result(self) -> RewardResult:
        if self._result is None:
            outcomes, self.rule_seconds = self._rules.result()
            self._result = self._assemble(outcomes)
        return self._result


def _check_spec(i: int, spec: RewardSpec) -> tuple[str, float, dict]:
    """Validate reward[i]: (name, weight, kwargs) -> the same, checked; errors name the index."""
    try:
        name, weight, kwargs = spec
    except (TypeError, ValueError):
        raise ValueError(f"reward[{i}]: expected (name, weight, kwargs), got {spec!r}") from None
    if not isinstance(name, str):
        raise TypeError(f"reward[{i}]: name must be a string, got {name!r}")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise TypeError(f"reward[{i}] ({name}): weight must be a finite number, got {weight!r}")
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"reward[{i}] ({name}): kwargs must be a mapping, got {kwargs!r}")
    if name in MODEL_REWARDS:  # checked when the model term is built
        return name, float(weight), dict(kwargs)
    try:
        fn = resolve_reward(name)
    except Exception as e:
        raise _indexed(e, i) from e
    try:
        # Catch misspelt kwargs now rather than as an error on every sample.
        inspect.signature(fn).bind("", "", {}, **kwargs)
    except TypeError as e:
        raise TypeError(f"reward[{i}] ({name}): bad kwargs {dict(kwargs)!r}: {e}") from None
    preflight = getattr(fn, "preflight", None)  # e.g. code: refuse a machine that lacks a sandbox guarantee
    if preflight is not None:
        try:
            preflight(**kwargs)
        except Exception as e:
            raise _indexed(e, i) from e
    return name, float(weight), dict(kwargs)


def _indexed(e: Exception, i: int) -> Exception:
    """The same kind of exception, its message prefixed "reward[i]: " with i filled in."""
    message = f"reward[{i}]: " + str(e).replace("reward[i]", f"reward[{i}]")
    try:
        return type(e)(message)
    except Exception:  # exception types whose constructor wants other arguments
        return ValueError(f"{message} ({type(e).__name__})")


def _short_name(name: str) -> str:
    if not name.startswith(USER_PREFIX):
        return name
    path, _, fn = name[len(USER_PREFIX):].rpartition(":")
    return f"{path.rsplit('/', 1)[-1].removesuffix('.py')}.{fn}"
