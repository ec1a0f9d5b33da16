"""The agent loop: turns, tool turns and their token bookkeeping with a scripted engine; with a real
engine, the log-probs of the model's segments equal one forward over the whole trajectory and tool
tokens get exactly zero gradient."""

import copy
import json

import pytest
import torch

from rlcore.actor import Actor, micro_batches, sequence_lengths
from rlcore.agent import AgentEngine, Trajectory, agent_metrics, reward_inputs
from rlcore.batch import RolloutBatch, TrainBatch
from rlcore.config import RLConfig
from rlcore.data import Prompts
from rlcore.logprobs import response_logprobs
from rlcore.models import char_tokenizer, tiny_model
from rlcore.toolcall import ToolTurns
from rlcore.tools import ToolResult, calculator
from rlcore.warmstart import supervised_warmstart
from rollout import HFEngine, Sample, SamplingParams
from rollout.base import cut_to_budget

TOK = char_tokenizer()
EOS = TOK.eos_token_id
PROMPT = TOK.apply_chat_template([{"role": "user", "content": "6*7="}], tokenize=False, add_generation_prompt=True)
PROMPT_IDS = TOK(PROMPT)["input_ids"]


def ids(text):
    return TOK(text)["input_ids"]


def hermes(expression):
    return "<tool_call>" + json.dumps({"name": "calculator", "arguments": {"expression": expression}}) + "</tool_call>"


class ScriptedEngine:
    """Answers a context with reply(context text, sample index) and EOS; log-prob -0.01 x position;
    routing (when asked) marks every position with the number of the call that produced it."""

    def __init__(self, reply, routing=False):
        self.reply, self.routing, self.calls = reply, routing, []

    def generate(self, prompts, sampling, max_new_tokens=None):
        self.calls.append(([TOK.decode(p) for p in prompts], max_new_tokens, sampling.n))
        out = []
        for i, p in enumerate(prompts):
            budget = sampling.max_new_tokens if max_new_tokens is None else max_new_tokens[i]
            group = []
            for k in range(sampling.n):
                new = ids(self.reply(TOK.decode(p), k)) + [EOS]
                route = torch.full((len(p) + len(new) - 1, 1, 1), len(self.calls)) if self.routing else None
                sample = Sample(new, [-0.01 * (j + 1) for j in range(len(new))], "stop", route)
                group.append(cut_to_budget(sample, budget, len(p)))
            out.append(group)
        return out


class Calculator:
    """The calculator, in process (the runner's workers are tested in test_tools.py)."""

    def run(self, calls):
        return [ToolResult(calculator(**c.arguments), None, 0.25) for c in calls]


def agent(reply, max_turns=3, routing=False, tool_format="hermes"):
    engine = ScriptedEngine(reply, routing)
    return AgentEngine(engine, TOK, Calculator(), max_turns=max_turns, tool_format=tool_format), engine


def call_then_answer(context, k):
    # After the call the script runs on (a hallucinated tool turn): the turn must end at the call.
    return "42" if "tool:" in context else hermes("6*7") + "\ntool: 41\nassistant: 41"


def test_a_call_its_tool_turn_and_the_answer_as_one_token_sequence():
    rollout, engine = agent(call_then_answer)
    (group,) = rollout.generate([PROMPT_IDS], SamplingParams(n=2, max_new_tokens=200))
    call, tool, answer = ids(hermes("6*7")), ToolTurns(TOK).ids("calculator", "42"), ids("42") + [EOS]
    assert TOK.decode(tool) == "\ntool: 42\nassistant: "
    for t in group:
        assert t.token_ids == call + tool + answer and t.finish_reason == "stop"
        assert t.mask == [1] * len(call) + [0] * len(tool) + [1] * len(answer)
        expected = [-0.01 * (j + 1) for j in range(len(call))] + [0.0] * len(tool) + [-0.01, -0.02, -0.03]
        assert t.logprobs == pytest.approx(expected)
        assert [x["role"] for x in t.turns] == ["assistant", "tool", "assistant"]
        assert t.turns[1] | {"tokens": None} == {"role": "tool", "name": "calculator", "arguments": {
            "expression": "6*7"}, "content": "42", "error": None, "seconds": 0.25, "tokens": None}
        assert t.final_ids == answer
    # Round 2: every sample that was ready, in one batch, each with the budget it has left.
    assert engine.calls[1][1:] == ([200 - len(call) - len(tool)] * 2, 1)
    assert engine.calls[1][0] == [PROMPT + hermes("6*7") + "\ntool: 42\nassistant: "] * 2
    assert len(engine.calls) == 2


def test_rewards_get_the_answer_and_the_whole_trajectory():
    rollout, _ = agent(call_then_answer)
    (group,) = rollout.generate([PROMPT_IDS], SamplingParams(n=1, max_new_tokens=200))
    responses, rows = reward_inputs(group, [{"answer": "42"}], TOK)
    assert responses == ["42"]
    record = rows[0]["trajectory"]
    assert record["text"] == hermes("6*7") + "\ntool: 42\nassistant: 42" and record["finish_reason"] == "stop"
    assert [t["content"] for t in record["turns"]] == [hermes("6*7"), "42", "42"]
    assert rows[0]["answer"] == "42" and "tokens" not in record["turns"][1]


def test_turn_limit_budget_and_unfinished_calls_end_the_sample():
    always = agent(lambda context, k: hermes("1+1"), max_turns=2)[0]
    (t,), = always.generate([PROMPT_IDS], SamplingParams(n=1, max_new_tokens=400))
    assert t.finish_reason == "turns" and [x["role"] for x in t.turns] == ["assistant", "tool", "assistant"]
    assert t.mask[-1] == 1  # the last turn's call was not run: the trajectory ends on the model's tokens

    call = len(ids(hermes("6*7")))
    rollout = agent(call_then_answer)[0]
    (t,), = rollout.generate([PROMPT_IDS], SamplingParams(n=1, max_new_tokens=call + 5))  # the tool turn won't fit
    assert t.finish_reason == "length" and t.token_ids == ids(hermes("6*7")) and t.turns[-1]["tokens"] is None
    (t,), = rollout.generate([PROMPT_IDS], SamplingParams(n=1, max_new_tokens=20))  # the call never closes
    assert t.finish_reason == "length" and len(t.token_ids) == 20 and len(t.turns) == 1

    metrics = agent_metrics([Sample([1], [0.0], "stop")])  # no trajectories, no agent metrics
    assert metrics == {}


def test_agent_metrics_and_batch_layout():
    rollout, _ = agent(lambda context, k: "42" if "tool:" in context or k else hermes("6*7"))
    (group,) = rollout.generate([PROMPT_IDS], SamplingParams(n=2, max_new_tokens=200))
    m = agent_metrics(group)
    tool_tokens = len(ToolTurns(TOK).ids("calculator", "42"))
    assert m == {"agent/turns_mean": 1.5, "agent/tool_calls": 1.0, "agent/tool_errors": 0.0,
                 "agent/tool_seconds": 0.25, "agent/truncated": 0.0, "agent/tool_tokens_mean": tool_tokens / 2}
    batch = RolloutBatch.from_samples([PROMPT_IDS], [group])
    assert batch.lengths.tolist() == [len(group[0].token_ids), 3] == batch.real_lengths().tolist()
    assert batch.mask[0].tolist() == [float(x) for x in group[0].mask]
    assert (batch.rollout_logprobs[0][batch.mask[0] == 0] == 0).all()
    assert batch.mask[1, :3].tolist() == [1.0] * 3 and batch.mask[1, 3:].sum() == 0


def test_moe_routing_of_each_position_comes_from_the_turn_that_first_computed_it():
    rollout, _ = agent(call_then_answer, routing=True)
    (t,), = rollout.generate([PROMPT_IDS], SamplingParams(n=1, max_new_tokens=200))
    p, call = len(PROMPT_IDS), len(ids(hermes("6*7")))
    assert t.routing.shape == (p + len(t.token_ids) - 1, 1, 1)
    # The prompt and the call's inputs from call 1; the call's last token, the tool turn and the answer from call 2.
    assert (t.routing[: p + call - 1] == 1).all() and (t.routing[p + call - 1 :] == 2).all()


# ------------------------------------------------------------------------------------- a real model

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: two intra-op threads on a busy 2-core machine spin-wait (100x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tool_user():
    """A tiny model that learned one tool-use trace (a python block, its output, the answer), and a
    batch of its trajectories sampled through the hf engine with the tool answering."""
    torch.manual_seed(0)
    model = tiny_model(len(TOK), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                       seed=0)
    trace = [{"role": "assistant", "content": "```python\nprint(6*7)\n```"},
             {"role": "tool", "name": "python", "content": "42\n"}, {"role": "assistant", "content": "42"}]
    prompts = Prompts([{"target": trace}], [PROMPT], [PROMPT_IDS], 0)
    # Half learnt: some samples call the tool, others wander (log-probs far from 0 on both).
    supervised_warmstart(model, TOK, prompts, steps=50, lr=1e-2, batch_size=1, target_key="target",
                         until_accuracy=0.0, seed=0, device="cpu")
    model.eval()

    class Python:
        def run(self, calls):
            return [ToolResult("42\n", None, 0.0) for _ in calls]

    engine = HFEngine(copy.deepcopy(model), eos_token_ids=[EOS], pad_token_id=TOK.pad_token_id, mode="generate")
    rollout = AgentEngine(engine, TOK, Python(), max_turns=3, tool_format="python_block")
    torch.manual_seed(0)
    groups = rollout.generate([PROMPT_IDS, TOK("user: 5*5=\nassistant: ")["input_ids"]],
                              SamplingParams(n=4, max_new_tokens=80, temperature=1.0))
    batch = RolloutBatch.from_samples([PROMPT_IDS, TOK("user: 5*5=\nassistant: ")["input_ids"]], groups)
    assert sum(len(t.turns) > 1 for g in groups for t in g) >= 2, "the model should call its tool"
    return model, batch


def test_model_segments_logprobs_equal_one_forward_over_the_whole_trajectory(tool_user):
    model, b = tool_user
    with torch.no_grad():
        logp, _ = response_logprobs(model, b.prompt_ids, b.response_ids, b.mask, temperature=1.0, pad_id=0,
                                    lengths=b.lengths)
    keep = b.mask.bool()
    assert (b.mask == 0).logical_and(torch.arange(b.mask.shape[1]) < b.lengths[:, None]).any()  # tool tokens
    torch.testing.assert_close(logp[keep], b.rollout_logprobs[keep], rtol=0, atol=2e-5)  # turn by turn = one pass
    assert (logp[~keep] == 0).all()
    for i in range(len(b)):  # and both equal a plain unpadded forward over prompt + trajectory
        n = int(b.lengths[i])
        seq = torch.tensor(b.prompt_ids[i] + b.response_ids[i, :n].tolist())[None]
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=seq).logits[0, len(b.prompt_ids[i]) - 1 : -1].float(), -1)
        expected = ref.gather(-1, b.response_ids[i, :n, None])[:, 0]
        m = keep[i, :n]
        torch.testing.assert_close(logp[i, :n][m], expected[m], rtol=0, atol=2e-5)


def update_grads(model, batch: TrainBatch, packed: bool = False):
    """The gradients of one actor update and, padded, of its final hidden states (rows in batch order)."""
    cfg = RLConfig()
    cfg.train.lr, cfg.train.max_grad_norm, cfg.train.packing = 1e-9, 0.0, packed
    actor = Actor(model, cfg, pad_id=0, seqs_per_minibatch=len(batch))
    seq_lens = sequence_lengths(batch.prompt_ids, batch.lengths)
    (order,) = micro_batches(seq_lens, cfg.train.max_tokens_per_microbatch, packed=packed)  # one pass
    hidden = []  # the final hidden states: position p feeds only the LM head's prediction of token p + 1

    def keep(module, inputs, out):
        out.retain_grad()
        hidden.append(out)

    hook = model.model.norm.register_forward_hook(keep)
    try:
        actor.update(batch)
    finally:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if packed:
        return grads, None
    by_row = torch.zeros_like(hidden[0].grad)
    by_row[order] = hidden[0].grad
    return grads, by_row


def test_tool_tokens_get_exactly_zero_gradient(tool_user):
    model, b = tool_user
    g = torch.Generator().manual_seed(0)
    advantages = torch.randn(b.mask.shape, generator=g) * b.mask
    old = b.rollout_logprobs - 0.05 * b.mask

    def train_batch(adv, old_logprobs):
        return TrainBatch(b.prompt_ids, b.response_ids, b.mask, old_logprobs, None, adv, lengths=b.lengths)

    grads, hidden_grad = update_grads(copy.deepcopy(model), train_batch(advantages, old))
    # The hidden state that predicts each response token: zero gradient exactly where that token is a tool's.
    starts = torch.tensor([len(p) for p in b.prompt_ids])
    real = torch.arange(b.mask.shape[1]) < b.lengths[:, None]
    for i in range(len(b)):
        for t in range(int(b.lengths[i])):
            row = hidden_grad[i, starts[i] - 1 + t]
            assert (row == 0).all() if b.mask[i, t] == 0 else row.abs().sum() > 0, (i, t)
    # Whatever the advantages and old log-probs say at tool positions, the gradient is bitwise the same.
    # Padded and packed (the default) alike.
    tool = (b.mask == 0) & real
    garbage = torch.where(tool, torch.full_like(advantages, 1e3), advantages)
    for packed in (False, True):
        grads, _ = update_grads(copy.deepcopy(model), train_batch(advantages, old), packed)
        same, _ = update_grads(copy.deepcopy(model), train_batch(garbage, torch.where(tool, -50.0, old)), packed)
        assert all(torch.equal(grads[k], same[k]) for k in grads), packed
        assert any(grads[k].abs().sum() > 0 for k in grads)
