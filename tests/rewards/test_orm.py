"""OutcomeRewardModel: exact scores from a hand-set tiny ORM, chat template, padding, normalisations.

Hand-set backbone as in test_prm (1-layer Qwen2, D = 64, eps 1e-6, uniform causal attention): at the
last token p, with f = (number of "x" tokens in 0..p) / (p + 1),
  r = sqrt((C² + A²)/D + eps),  o = G * (A / r) * f,  R = sqrt((C² + A² + o²)/D + eps),
  z_0 = C / R,  z_3 = o / R,
and the sequence-classification head reads score = W*z_3 + V*z_0 at the last non-pad token.
"""

import math
import statistics

import pytest
import torch
from transformers import Qwen2ForSequenceClassification

from rewards.orm import OutcomeRewardModel, build_tiny_orm
from rewards.prm import tiny_qwen2_config
from rlcore.models import char_tokenizer

C, A, G, D, EPS = 1.0, 1.0, 1.0, 64, 1e-6
W, V = 0.5, 0.2


def z_parts(f: float) -> tuple[float, float]:
    r = math.sqrt((C**2 + A**2) / D + EPS)
    o = G * (A / r) * f
    big_r = math.sqrt((C**2 + A**2 + o**2) / D + EPS)
    return C / big_r, o / big_r


def score(f: float) -> float:
    z0, z3 = z_parts(f)
    return W * z3 + V * z0


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def hand_set(model, x_id: int, *, num_labels: int = 1) -> None:
    """Backbone as in the module docstring; head row num_labels-1 reads W*z_3 (+ V*z_0 for one label,
    - V*z_0 via row 0 for two labels, so the margin is W*z_3 - V*z_0)."""
    backbone = model.model
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = backbone.embed_tokens.weight
        emb[:, 0] = C
        emb[:, 2] = A
        emb[x_id, 2] = 0.0
        emb[x_id, 1] = A
        layer = backbone.layers[0]
        layer.input_layernorm.weight.fill_(1.0)
        layer.post_attention_layernorm.weight.fill_(1.0)
        backbone.norm.weight.fill_(1.0)
        layer.self_attn.v_proj.weight[0, 1] = 1.0
        layer.self_attn.o_proj.weight[3, 0] = G
        model.score.weight[num_labels - 1, 3] = W
        model.score.weight[0, 0] = V


def save(path, model, tok):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def orm_path(tmp_path_factory):
    model, tok = build_tiny_orm(char_tokenizer())
    hand_set(model, tok.convert_tokens_to_ids("x"))
    return save(tmp_path_factory.mktemp("orm"), model, tok)


PROMPTS, RESPONSES = ["q", "q", "qq"], ["xx", "abx", ""]
# Plain prompt + response: "qxx" 2 x in 3 tokens; "qabx" 1 in 4; "qq" none in 2.
PLAIN = [score(2 / 3), score(1 / 4), score(0.0)]


def test_hand_set_scores_without_template_and_padding(orm_path):
    batched = OutcomeRewardModel(orm_path, apply_chat_template=False)(PROMPTS, RESPONSES)
    alone = OutcomeRewardModel(orm_path, apply_chat_template=False, batch_size=1)(PROMPTS, RESPONSES)
    # Three lengths in one right-padded batch: each score is read at its own last token.
    assert batched == pytest.approx(PLAIN, rel=1e-5, abs=1e-7)
    assert batched == pytest.approx(alone, rel=1e-6, abs=1e-7)
    assert score(0.0) == pytest.approx(V * C / math.sqrt((C**2 + A**2) / D + EPS))  # f = 0: only z_0


def test_chat_template_path(orm_path):
    got = OutcomeRewardModel(orm_path)(["q", "q"], ["xx", "abx"])
    # "user: q\n" (8 tokens) + "assistant: " (11) + response + "\n": "xx" -> 2 x in 22 tokens,
    # "abx" -> 1 x in 23. The head reads the template's final "\n".
    assert got == pytest.approx([score(2 / 22), score(1 / 23)], rel=1e-5, abs=1e-7)


def test_max_length_keeps_the_end(orm_path):
    got = OutcomeRewardModel(orm_path, apply_chat_template=False, max_length=2)(["q"], ["xx"])
    assert got == pytest.approx([score(1.0)], rel=1e-5)  # "qxx" cut from the left to "xx": f = 2/2


def test_normalisations_by_hand(orm_path):
    sig = OutcomeRewardModel(orm_path, apply_chat_template=False, normalize="sigmoid")(PROMPTS, RESPONSES)
    assert sig == pytest.approx([sigmoid(s) for s in PLAIN], rel=1e-5)
    assert all(0.0 < s < 1.0 for s in sig)

    z = OutcomeRewardModel(orm_path, apply_chat_template=False, normalize="batch")(PROMPTS, RESPONSES)
    mean, std = statistics.fmean(PLAIN), statistics.stdev(PLAIN)  # stdev: unbiased (n - 1)
    assert z == pytest.approx([(s - mean) / (std + 1e-6) for s in PLAIN], rel=1e-5, abs=1e-6)
    assert sum(z) == pytest.approx(0.0, abs=1e-6)

    one = OutcomeRewardModel(orm_path, normalize="batch")
    assert one(["q"], ["xx"]) == [0.0]  # a batch of one has no spread
    assert one([], []) == []


def test_two_labels_score_is_the_margin(tmp_path):
    tok = char_tokenizer()
    config = tiny_qwen2_config(tok, hidden_size=64, num_layers=1, num_labels=2)
    model = Qwen2ForSequenceClassification(config)
    hand_set(model, tok.convert_tokens_to_ids("x"), num_labels=2)
    path = save(tmp_path, model, tok)
    # logit_1 = W*z_3, logit_0 = V*z_0: score = W*z_3 - V*z_0; sigmoid of it = softmax(logits)[1].
    z0, z3 = z_parts(2 / 3)
    margin = OutcomeRewardModel(path, apply_chat_template=False)(["q"], ["xx"])
    assert margin == pytest.approx([W * z3 - V * z0], rel=1e-5)
    p1 = OutcomeRewardModel(path, apply_chat_template=False, normalize="sigmoid")(["q"], ["xx"])
    assert p1 == pytest.approx([torch.tensor([V * z0, W * z3]).softmax(-1)[1].item()], rel=1e-5)


def test_pad_token_id_missing_from_config_is_set(tmp_path):
    model, tok = build_tiny_orm(char_tokenizer())
    hand_set(model, tok.convert_tokens_to_ids("x"))
    model.config.pad_token_id = None  # as many checkpoints ship: batches > 1 would fail in the pooling
    orm = OutcomeRewardModel(save(tmp_path, model, tok), apply_chat_template=False)
    assert orm.model.config.pad_token_id == tok.pad_token_id
    assert orm(PROMPTS, RESPONSES) == pytest.approx(PLAIN, rel=1e-5, abs=1e-7)


def test_random_tiny_orm_round_trip(tmp_path):
    model, tok = build_tiny_orm(char_tokenizer(), seed=5)
    orm = OutcomeRewardModel(save(tmp_path, model, tok), apply_chat_template=False, offload=False)
    with torch.no_grad():
        want = model(torch.tensor([tok("qabx").input_ids])).logits[0, 0].item()
    assert orm(["q"], ["abx"]) == pytest.approx([want], rel=1e-5)
    assert next(orm.model.parameters()).device.type == "cpu"


def test_bad_arguments(orm_path, tmp_path):
    with pytest.raises(ValueError, match="normalize='zscore'"):
        OutcomeRewardModel(orm_path, normalize="zscore")
    with pytest.raises(ValueError, match="dtype='fp8'"):
        OutcomeRewardModel(orm_path, dtype="fp8")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        OutcomeRewardModel(str(tmp_path))
    with pytest.raises(ValueError, match="1 prompts and 2 responses"):
        OutcomeRewardModel(orm_path)(["q"], ["a", "b"])
    tok = char_tokenizer()
    three = Qwen2ForSequenceClassification(tiny_qwen2_config(tok, hidden_size=64, num_layers=1, num_labels=3))
    with pytest.raises(ValueError, match="num_labels=3"):
        OutcomeRewardModel(save(tmp_path / "three", three, tok))
