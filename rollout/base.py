"""The rollout protocol: sampling parameters, one generated sample, the engine interface, the registry.

Every backend (``hf`` here, ``vllm`` later) takes token ids in and gives token ids, per-token
log-probs and a finish reason out; tokenisation and chat templates stay with the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Same meaning as vLLM's fields of the same name.

    Filters apply in vLLM's order: logits / temperature, then top-k, then top-p.
    ``temperature == 0`` means greedy decoding (argmax of the raw logits); top-k/top-p cannot
    change an argmax, so they are ignored then.
    """

    n: int = 1
    """Samples per prompt."""
    max_new_tokens: int = 256
    """Most tokens generated per sample, the stop token included."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; 1 = off."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 = off."""
    stop_token_ids: tuple[int, ...] = field(default=())
    """Token ids that end a sample, in addition to the engine's eos ids."""

    def __post_init__(self) -> None:
        problems = []
        if self.n < 1:
            problems.append(f"n={self.n} must be >= 1")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))
        # A list would make the frozen dataclass unhashable; accept it and store a tuple.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Sample:
    """One generated continuation of one prompt."""

    token_ids: list[int]
    """Generated tokens, including the eos/stop token if one ended the sample."""
    logprobs: list[float]
    """Same length as token_ids: log-prob of each sampled token under the distribution it was sampled
    from ("processed" mode: log_softmax(logits / temperature) after top-k/top-p masking, i.e. renormalised
    over the kept tokens). Greedy (temperature 0): log_softmax(logits)[argmax], the raw T=1 distribution."""
    finish_reason: str
    """"stop" (the last token is an eos/stop token) or "length" (max_new_tokens reached without one)."""
    routing: torch.Tensor | None = None
    """MoE models, when the engine records routing: (prompt + generated - 1, layers, top_k) ids of the
    experts each fed token was routed to (rollout.routing); None otherwise."""


class Engine(Protocol):
    """What the trainer drives. Call order per RL step: wake, load_weights, generate, sleep."""

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 max_new_tokens: list[int] | None = None) -> list[list[Sample]]:
        """prompts: token ids, any lengths -> result[i] = the sampling.n samples of prompts[i].
        max_new_tokens: per-prompt budgets (check_budgets), overriding sampling.max_new_tokens."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full tensors named as in the model's Hugging Face state_dict into the engine, streaming."""
        ...

    def sleep(self) -> None:
        """Release the engine's device memory until wake()."""
        ...

    def wake(self) -> None:
        """Bring the engine's weights back to its device."""
        ...


def check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    """Every prompt has at least one token, each inside the vocabulary; names the first bad prompt."""
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise ValueError(f"prompt {i} has a token id outside [0, {vocab_size})")


def check_budgets(budgets: list[int] | None, num_prompts: int, sampling: SamplingParams) -> None:
    """Per-prompt budgets (multi-turn rollouts: each continuation has its own share of a sample's
    token budget left): one per prompt, each in [1, sampling.max_new_tokens]."""
    if budgets is None:
        return
    if len(budgets) != num_prompts:
        raise ValueError(f"got {len(budgets)} max_new_tokens budgets for {num_prompts} prompts; give one per prompt")
    if budgets and not 1 <= min(budgets) <= max(budgets) <= sampling.max_new_tokens:
        raise ValueError(f"every max_new_tokens budget must be in [1, sampling.max_new_tokens="
                         f"{sampling.max_new_tokens}]; got {min(budgets)}..{max(budgets)}")


def cut_to_budget(sample: Sample, budget: int, prompt_len: int) -> Sample:
    """The sample's first `budget` tokens ("length" when that cuts it). Discarding tokens past a
    budget is the same as stopping there: each token is sampled given only the ones before it, so
    the kept tokens and their log-probs are what a run stopped at the budget would have sampled."""
    if len(sample.token_ids) <= budget:
        return sample
    routing = None if sample.routing is None else sample.routing[: prompt_len + budget - 1]
    return Sample(sample.token_ids[:budget], sample.logprobs[:budget], "length", routing)


def stop_ids(eos_token_ids, sampling: SamplingParams) -> list[int]:
    """The eos ids, then the sampling's stop ids, each once, in that order."""
    return list(dict.fromkeys([*eos_token_ids, *sampling.stop_token_ids]))


CHECKSUM_ROWS_ELEMENTS = 1 << 24
"""Elements per checksum chunk: a float64 temporary of 128 MiB, never 8 bytes x the largest tensor
(a 7B model's embedding would need 4.4 GiB)."""


def probe(size: int) -> torch.Tensor:
    """The fixed +-1 vector (size,) in float64 that checksums multiply matrices by (seeded by size)."""
    g = torch.Generator().manual_seed(size)
    return torch.randint(0, 2, (size,), generator=g, dtype=torch.float64) * 2 - 1


@torch.no_grad()
def checksum(t: torch.Tensor) -> tuple[float, float]:
    """fold(t @ probe(K)) for a matrix t (..., K): the float64 pair of what t computes on a fixed
    vector; fold(t) for a vector or a scalar.

    Why a product and not the elements: an engine may compute a layer with a packed copy of its
    weight (vLLM on CPU empties the parameter and keeps a oneDNN copy), so the engine side must
    checksum what the layer computes: it runs the layer on the probe vector and folds its output.
    A scaled, zeroed, stale or permuted tensor changes the pair. A chunk of rows at a time (views
    welcome: no full copy)."""
    t = t.detach()
    if t.dim() < 2:
        return fold(t.reshape(-1))
    t = t.reshape(-1, t.shape[-1])
    if t.numel() == 0:
        return 0.0, 0.0
    r, s = probe(t.shape[-1]).to(t.device), probe(t.shape[0]).to(t.device)
    rows = max(1, CHECKSUM_ROWS_ELEMENTS // t.shape[-1])
    total = absolute = 0.0
    for start in range(0, t.shape[0], rows):
        y = t[start : start + rows].double() @ r  # (rows,)
        total += float(y @ s[start : start + rows])
        absolute += float(y.abs().sum())
    return total, absolute


@torch.no_grad()
def fold(y: torch.Tensor) -> tuple[float, float]:
    """(probe(N) . y, sum |y|) in float64 of a vector y (N,): signs fixed per position, so a permuted
    vector changes the first number and a scaled one both."""
    y = y.detach().reshape(-1).double()
    return float(y @ probe(y.numel()).to(y.device)), float(y.abs().sum())


ENGINES: dict[str, type] = {}
"""Engine backends by name (the value of rollout.engine in a recipe)."""

_T = TypeVar("_T", bound=type)


def register(name: str) -> Callable[[_T], _T]:
    """Class decorator: ENGINES[name] = cls. A second class under the same name is a bug, so it raises."""

    def add(cls: _T) -> _T:
        if name in ENGINES:
            raise ValueError(f"engine {name!r} already registered as {ENGINES[name].__qualname__}")
        ENGINES[name] = cls
        return cls

    return add


def get_engine(name: str) -> type:
    """ENGINES[name], with an error that lists the valid names."""
    try:
        return ENGINES[name]
    except KeyError:
        raise KeyError(f"unknown rollout engine {name!r}; registered: {sorted(ENGINES)}") from None
