"""The supervised warm start: stops at the accuracy asked for, and is cached."""

import json

import torch

from rlcore.data import tokenize_prompts
from rlcore.config import DataConfig
from rlcore.models import char_tokenizer, tiny_model
from rlcore.warmstart import cache_root, cached_warmstart, target_tokens, train_accuracy


def setup():
    tok = char_tokenizer()
    rows = [{"prompt": f"{a}?", "answer": "7"} for a in range(50)]  # one constant answer: learnt in a few steps
    prompts = tokenize_prompts(rows, tok, DataConfig(), "test")
    model = tiny_model(len(tok), hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64)
    return tok, prompts, model


def test_stops_early_at_target_accuracy_and_caches(capsys):
    tok, prompts, model = setup()
    assert train_accuracy(model, tok, prompts, list(range(50)), "answer") == 0.0
    key = {"test": "constant-answer"}
    kwargs = dict(steps=5000, lr=3e-3, batch_size=16, target_key="answer", until_accuracy=0.9, seed=0, device="cpu")
    trained = cached_warmstart(model, tok, prompts, key, **kwargs)
    assert train_accuracy(trained, tok, prompts, list(range(50)), "answer") >= 0.9
    log = capsys.readouterr().err
    assert "train accuracy" in log and "5000/5000" not in log  # stopped long before the step limit
    assert any(cache_root().glob("warmstart/*/config.json"))
    again = cached_warmstart(setup()[2], tok, prompts, key, **kwargs)  # a fresh model: served from the cache
    assert "reusing" in capsys.readouterr().err
    for a, b in zip(trained.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_accuracy_is_checked_every_check_every_steps(capsys):
    """The stop lands on a multiple of check_every: with 3 the run stops sooner than with 25 steps
    between checks, at the first check that reaches the target."""
    from rlcore.warmstart import supervised_warmstart

    stops = {}
    for every in (3, 25):
        tok, prompts, model = setup()
        supervised_warmstart(model, tok, prompts, steps=500, lr=3e-3, batch_size=16, target_key="answer",
                             until_accuracy=0.9, seed=0, device="cpu", check_every=every)
        last = [line for line in capsys.readouterr().err.splitlines() if "train accuracy" in line][-1]
        stops[every] = int(last.split()[2].split("/")[0])
        assert stops[every] % every == 0 and stops[every] < 500
    assert stops[3] < stops[25] and stops[3] > stops[25] - 25


def test_tool_traces_train_the_models_turns_and_insert_the_tool_turns_as_rollouts_do():
    """A trace's tool turn is the template's tokens (as the agent inserts them), untrained except its
    first position, which learns EOS: the model ends its turn at the call."""
    from rlcore.tasks import Arithmetic
    from rlcore.toolcall import ToolTurns
    from rlcore.tools import calculator

    tok = char_tokenizer()
    row = Arithmetic(num_digits=3, ops="*", answer_format="tool_calculator").rows("train", 1, seed=0)[0]
    call, tool, answer = row["target"]
    assert tool["content"] == calculator(**json.loads(call["content"][11:-12])["arguments"]) == row["answer"]
    ((ids, labels),) = target_tokens(tok, [row["target"]])
    call_ids, turn_ids = tok(call["content"])["input_ids"], ToolTurns(tok).ids("calculator", row["answer"])
    answer_ids = tok(row["answer"])["input_ids"] + [tok.eos_token_id]
    assert ids == call_ids + turn_ids + answer_ids
    assert labels == call_ids + [tok.eos_token_id] + [-100] * (len(turn_ids) - 1) + answer_ids
    ((ids, labels),) = target_tokens(tok, ["82"])  # a plain text target: all of it and EOS
    assert ids == labels == tok("82")["input_ids"] + [tok.eos_token_id]
