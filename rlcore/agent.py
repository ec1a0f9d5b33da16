"""Multi-turn rollouts with tools: the model calls tools while it generates (rollout.max_turns, rollout.tools).

One rollout of P prompts x n samples runs in rounds:
  1. generate: the next turn of every sample that is ready, as one batch through the engine, each with
     its own share left of rollout.max_new_tokens (the budget of all of a sample's response tokens:
     the model's, the template's and the tools');
  2. parse: the first complete tool call of each new turn ends that turn (rlcore.toolcall);
  3. tools: every call of the round, in parallel in the tool workers (rlcore.tools.ToolRunner);
  4. tool turns: the chat template's tokens around each result are appended (rlcore.toolcall.ToolTurns).
A sample ends at a turn without a call (finish "stop", or "length" when its budget ran out), after
rollout.max_turns turns ("turns": its last turn holds a call, which is not run), or when the next tool
turn does not fit its budget with one token to spare ("length"). A round waits for its slowest tool
(at most rollout.tool_timeout_s); every sample that is ready then goes into one batch.

Token ids are kept as generated and as the template gave them, never re-tokenised from text, so the
trainer scores exactly what was sampled. `mask` marks the model's tokens, the only ones trained; the
template's and the tools' are real tokens of the sequence with mask 0 (rlcore.batch).

MoE routing (Sample.routing, for routing replay): each position's experts are those the engine chose
the first time it computed that position for this trajectory: a model token's input position in the
turn that sampled from it, a template or tool token in the prefill of the next turn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from rlcore.toolcall import ToolCall, ToolTurns, decode_turn, find_call, stop_token_ids, tokens_through
from rollout import Sample, SamplingParams

FINISHED_EARLY = ("length", "turns")
"""Finish reasons of a trajectory that did not end with a final answer (agent/truncated)."""


@dataclass(frozen=True)
class Trajectory:
    """One multi-turn sample: model turns interleaved with tool turns, as one response sequence."""

    token_ids: list[int]
    """Every response token: the model's turns, and the template's and tools' tokens between them."""
    logprobs: list[float]
    """Same length: the engine's log-prob of each model token; 0.0 on the others."""
    mask: list[int]
    """Same length: 1 on model tokens (trained), 0 on template and tool tokens."""
    finish_reason: str
    """"stop" (a final turn ended by a stop token), "length" (the budget ran out) or "turns"
    (rollout.max_turns reached on a tool call)."""
    turns: list[dict]
    """In order: {"role": "assistant", "content", "tokens": [start, end)} and {"role": "tool", "name",
    "arguments", "content", "error", "seconds", "tokens": [start, end) or None when it did not fit}."""
    routing: torch.Tensor | None = None
    """MoE: (prompt + response - 1, layers, top_k) expert ids (module docstring), or None."""

    @property
    def final_ids(self) -> list[int]:
        """Token ids of the last model turn: the answer."""
        start, end = next(t["tokens"] for t in reversed(self.turns) if t["role"] == "assistant")
        return self.token_ids[start:end]

    def record(self, tokenizer) -> dict:
        """Plain data for rewards (row["trajectory"]): the whole response text, the turns, how it ended."""
        turns = [{k: v for k, v in t.items() if k != "tokens"} for t in self.turns]
        return {"text": tokenizer.decode(self.token_ids, skip_special_tokens=True), "turns": turns,
                "finish_reason": self.finish_reason}


class _State:
    """A trajectory being built."""

    def __init__(self, prompt: list[int], budget: int):
        self.prompt, self.budget = prompt, budget
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.mask: list[int] = []
        self.turns: list[dict] = []
        self.routing: list[tuple[int, torch.Tensor | None]] = []  # (positions this turn first computed, record)
        self.finish: str | None = None

    @property
    def left(self) -> int:
        return self.budget - len(self.ids)

    def add(self, ids: list[int], logprobs: list[float], trained: int) -> tuple[int, int]:
        start = len(self.ids)
        self.ids += ids
        self.logprobs += logprobs
        self.mask += [trained] * len(ids)
        return start, len(self.ids)

    def trajectory(self) -> Trajectory:
        return Trajectory(self.ids, self.logprobs, self.mask, self.finish, self.turns, self._routing())

    def _routing(self) -> torch.Tensor | None:
        if not self.routing or any(rec is None for _, rec in self.routing):
            return None
        parts, done = [], 0
        for end, rec in self.routing:  # each turn's record covers every position before its own end
            parts.append(rec[done:end])
            done = end
        return torch.cat(parts)


class AgentEngine:
    """The rollout engine the trainer drives when rollout.tools is set: same calls as an Engine
    (generate, wake, sleep), returning Trajectory samples. See the module docstring.

    tools: an rlcore.tools.ToolRunner (anything with run(calls) -> results).
    """

    def __init__(self, engine, tokenizer, tools, *, max_turns: int, tool_format: str):
        self.engine, self.tokenizer, self.tools = engine, tokenizer, tools
        self.max_turns, self.tool_format = max_turns, tool_format
        self.tool_turns = ToolTurns(tokenizer)
        self.stop_ids = tuple(stop_token_ids(tokenizer, tool_format))
        self._tool_wall_seconds = 0.0

    def pop_tool_wall_seconds(self) -> float:
        """Wall time the rollouts waited for tools since the last call (timing/tools)."""
        seconds, self._tool_wall_seconds = self._tool_wall_seconds, 0.0
        return seconds

    def wake(self) -> None:
        self.engine.wake()

    def sleep(self) -> None:
        self.engine.sleep()

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 max_new_tokens: list[int] | None = None) -> list[list[Trajectory]]:
        """prompts: P lists of token ids -> P lists of sampling.n Trajectories. sampling.max_new_tokens
        (or a prompt's max_new_tokens budget) is each trajectory's budget of response tokens."""
        if not prompts:
            return []
        n = sampling.n
        sampling = replace(sampling, stop_token_ids=(*sampling.stop_token_ids, *self.stop_ids))
        budgets = max_new_tokens or [sampling.max_new_tokens] * len(prompts)
        states = [_State(p, b) for p, b in zip(prompts, budgets) for _ in range(n)]
        ready = states
        out = self.engine.generate(prompts, sampling, max_new_tokens)
        for turn in range(1, self.max_turns + 1):
            samples = [s for group in out for s in group]
            calls = [self._model_turn(st, s, is_last=turn == self.max_turns) for st, s in zip(ready, samples)]
            self._tool_turns([(st, c) for st, c in zip(ready, calls) if c is not None])
            ready = [st for st in states if st.finish is None]
            if not ready:
                break
            left = [st.left for st in ready]
            # Each continuation has its own budget left; the engine cuts each to it (rollout.base.cut_to_budget).
            out = self.engine.generate([st.prompt + st.ids for st in ready],
                                       replace(sampling, n=1, max_new_tokens=max(left)), left)
        return [[st.trajectory() for st in states[i * n:(i + 1) * n]] for i in range(len(prompts))]

    def _model_turn(self, st: _State, sample: Sample, *, is_last: bool) -> ToolCall | None:
        """Append one generated turn, cut after its first complete call; the call, if it is to be run."""
        ids, logprobs = sample.token_ids, sample.logprobs
        call = find_call(decode_turn(self.tokenizer, ids), self.tool_format)
        if call is not None:  # the call ends the turn: what came after it is discarded (rlcore.toolcall)
            keep = tokens_through(self.tokenizer, ids, call.end)
            ids, logprobs = ids[:keep], logprobs[:keep]
        context = len(st.prompt) + len(st.ids)
        start, end = st.add(list(ids), list(logprobs), 1)
        st.turns.append({"role": "assistant", "content": self.tokenizer.decode(ids, skip_special_tokens=True),
                         "tokens": [start, end]})
        record = None if sample.routing is None else sample.routing[: context + len(ids) - 1]
        st.routing.append((context + len(ids) - 1, record))
        if call is None:
            st.finish = "length" if st.left <= 0 else sample.finish_reason
        elif is_last:
            st.finish = "turns"
        elif st.left <= 1:
            st.finish = "length"
        return call if st.finish is None else None

    def _tool_turns(self, pending: list[tuple[_State, ToolCall]]) -> None:
        """Run the round's calls and append each result as a tool turn (or end the sample when it does
        not fit its budget with a token to spare for the model's next turn)."""
        if not pending:
            return
        start = time.perf_counter()
        results = self.tools.run([c for _, c in pending])
        self._tool_wall_seconds += time.perf_counter() - start
        for (st, call), result in zip(pending, results):
            # Only what can fit is tokenised: a token holds at most a few dozen characters.
            content = result.content[: 64 * st.left]
            ids = self.tool_turns.ids(call.name or "tool", content)
            fits = len(ids) < st.left
            tokens = list(st.add(ids, [0.0] * len(ids), 0)) if fits else None
            st.turns.append({"role": "tool", "name": call.name, "arguments": call.arguments,
                             "content": result.content, "error": result.error, "seconds": result.seconds,
                             "tokens": tokens})
            if not fits:
                st.finish = "length"


# ------------------------------------------------------------------------------ what others read

def reward_inputs(samples: list, rows: list[dict], tokenizer) -> tuple[list[str], list[dict]]:
    """Per sample, the response text the rewards score and the row they get. A Trajectory's response
    is its final model turn (the answer, what exact / math / code judge), and its row gains
    "trajectory" (Trajectory.record: the whole text, every turn with its tool calls and results)."""
    responses, out_rows = [], []
    for s, row in zip(samples, rows):
        if isinstance(s, Trajectory):
            responses.append(tokenizer.decode(s.final_ids, skip_special_tokens=True))
            out_rows.append({**row, "trajectory": s.record(tokenizer)})
        else:
            responses.append(tokenizer.decode(s.token_ids, skip_special_tokens=True))
            out_rows.append(row)
    return responses, out_rows


def agent_metrics(samples: list) -> dict[str, float]:
    """agent/* over a step's trajectories ({} without tools): model turns per sample, tool calls,
    failed calls, seconds the tools ran (summed over calls), the fraction that ended without a final
    answer (budget or max_turns), template + tool tokens per sample."""
    trajectories = [s for s in samples if isinstance(s, Trajectory)]
    if not trajectories:
        return {}
    tools = [t for tr in trajectories for t in tr.turns if t["role"] == "tool"]
    num = len(trajectories)
    return {
        "agent/turns_mean": sum(t["role"] == "assistant" for tr in trajectories for t in tr.turns) / num,
        "agent/tool_calls": float(len(tools)),
        "agent/tool_errors": float(sum(t["error"] is not None for t in tools)),
        "agent/tool_seconds": float(sum(t["seconds"] for t in tools)),
        "agent/truncated": sum(tr.finish_reason in FINISHED_EARLY for tr in trajectories) / num,
        "agent/tool_tokens_mean": sum(len(tr.mask) - sum(tr.mask) for tr in trajectories) / num,
    }


def trajectory_markdown(prompt: str, trajectory: Trajectory, reward: float) -> str:
    """A trajectory for the TensorBoard text panel, each turn on its own line, tool turns marked."""
    lines = [f"**prompt** `{prompt!r}` | reward {reward:.3f} | {trajectory.finish_reason}", ""]
    for t in trajectory.turns:
        if t["role"] == "assistant":
            lines.append(f"- **model:** `{t['content']!r}`")
        else:
            mark = "tool error" if t["error"] is not None else "tool"
            cut = "" if t["tokens"] is not None else " (did not fit the budget)"
            lines.append(f"- 🔧 **[{mark}: {t['name']}]** `{t['content']!r}` ({t['seconds']:.2f} s){cut}")
    return "\n".join(lines)
