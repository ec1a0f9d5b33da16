"""ProcessRewardModel: exact step scores from hand-set tiny PRMs (both conventions), alignment, errors.

Hand-set model (1-layer Qwen2, hidden D = 64, RMSNorm eps 1e-6), every weight zero except:
  embedding e_t = (C, A*[t is "x"], A*[t is not "x"], 0, ...), so every token has the same norm;
  attention: q = k = 0, so it is uniform over the causal prefix 0..p; v reads normalised dim 1 and
  o_proj writes G times it into residual dim 3; MLP off (down_proj = 0); all RMSNorm weights 1.
At position p, with f = (number of "x" tokens in 0..p) / (p + 1):
  r = sqrt((C² + A²)/D + eps)          (input RMSNorm of every token)
  o = G * (A / r) * f                  (attention output in dim 3)
  h = e_p + o * e_3,  R = sqrt((C² + A² + o²)/D + eps),  z = h / R  (final RMSNorm)
  z_0 = C / R,  z_3 = o / R.
The head then reads z_0 and z_3, so each step's score is a closed form of f at its step token.
"""

import math

import pytest
import torch

from rewards.prm import AGGREGATIONS, ProcessRewardModel, StepScores, aggregate, build_tiny_prm
from rewards.steps import step_end_tokens
from rlcore.models import char_tokenizer

C, A, G, D, EPS = 1.0, 1.0, 1.0, 64, 1e-6
W, B0, V = 0.5, -1.0, 0.2  # head: qwen logit margin W*z_3 + B0; shepherd margin W*z_3 - V*z_0
RESPONSE = "xxx\n\nab\n\nxxxxx"  # steps "xxx", "ab", "xxxxx"
RESPONSE_ENDS = [5, 9, 14]


def z_parts(f: float) -> tuple[float, float]:
    r = math.sqrt((C**2 + A**2) / D + EPS)
    o = G * (A / r) * f
    big_r = math.sqrt((C**2 + A**2 + o**2) / D + EPS)
    return C / big_r, o / big_r


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def qwen_p(f: float) -> float:
    """softmax(logits)[1] with logit_0 = 0 and logit_1 = W*z_3 + B0."""
    return sigmoid(W * z_parts(f)[1] + B0)


def shepherd_p(f: float) -> float:
    """softmax over (logit_+, logit_-) = (W*z_3, V*z_0), keep p(+)."""
    z0, z3 = z_parts(f)
    return sigmoid(W * z3 - V * z0)


def hand_set_backbone(model, x_id: int) -> None:
    """Zero every weight, then set the backbone as in the module docstring (heads are set by the caller)."""
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
        layer.self_attn.v_proj.weight[0, 1] = 1.0  # KV head 0, dim 0 <- normalised dim 1 ("x")
        layer.self_attn.o_proj.weight[3, 0] = G  # residual dim 3 <- query head 0 (reads KV head 0), dim 0


def save_hand_set(path, convention: str, *, chat_template: bool = True):
    model, tok = build_tiny_prm(char_tokenizer(), convention=convention)
    x_id = tok.convert_tokens_to_ids("x")
    hand_set_backbone(model, x_id)
    with torch.no_grad():
        if convention == "qwen":
            model.score.weight[1, 3] = W
            model.score.bias[1] = B0
        else:
            model.lm_head.weight[tok.convert_tokens_to_ids("+"), 3] = W
            model.lm_head.weight[tok.convert_tokens_to_ids("-"), 0] = V
    if not chat_template:
        tok.chat_template = None
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory):
    return save_hand_set(tmp_path_factory.mktemp("prm-qwen"), "qwen")


@pytest.fixture(scope="module")
def shepherd_path(tmp_path_factory):
    return save_hand_set(tmp_path_factory.mktemp("prm-shepherd"), "shepherd")


# ---- exact scores, both conventions

def test_qwen_scores_by_hand(qwen_path):
    prm = ProcessRewardModel(str(qwen_path), convention="qwen", system_prompt="s")
    out = prm.score_steps(["q", "qqq"], [RESPONSE, "a\n\nxx"])
    # Sample 0, char template: "system: s\n" (10 tokens) "user: q\n" (8) "assistant: " (11) = 29 tokens,
    # then x x x <extra_0>@32 a b <extra_0>@35 x x x x x <extra_0>@41 "\n".
    #   step 1: 3 x in 33 tokens; step 2: 3 x in 36; step 3: 8 x in 42.
    # Sample 1: prefix 10 + 10 ("user: qqq\n") + 11 = 31, then a <extra_0>@32 x x <extra_0>@35:
    #   step 1: no x in 33 tokens -> f = 0, p = sigmoid(B0); step 2: 2 x in 36.
    expected = [[qwen_p(3 / 33), qwen_p(3 / 36), qwen_p(8 / 42)], [sigmoid(B0), qwen_p(2 / 36)]]
    assert isinstance(out, StepScores)
    assert out.char_ends == [RESPONSE_ENDS, [3, 5]]
    assert out.num_unscored == [0, 0]
    for got, want in zip(out.scores, expected):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert len({round(s, 4) for s in out.scores[0]}) == 3  # the steps really differ


def test_qwen_scores_without_chat_template(tmp_path):
    path = save_hand_set(tmp_path, "qwen", chat_template=False)
    out = ProcessRewardModel(str(path), convention="qwen", system_prompt="s").score_steps(["q"], [RESPONSE])
    # Plain join "s\nq\n" (4 tokens) + x x x <extra_0>@7 a b <extra_0>@10 x x x x x <extra_0>@16:
    #   3 x in 8 tokens, 3 in 11, 8 in 17.
    assert out.scores[0] == pytest.approx([qwen_p(3 / 8), qwen_p(3 / 11), qwen_p(8 / 17)], rel=1e-5, abs=1e-7)


def test_shepherd_scores_by_hand(shepherd_path):
    prm = ProcessRewardModel(str(shepherd_path), convention="shepherd")
    out = prm.score_steps(["q", "qqq"], [RESPONSE, "a\n\nxx"])
    # Sample 0: "q xxx ки\nab ки\nxxxxx ки" -> q _ x x x _ ки@6 \n a b _ ки@11 \n x x x x x _ ки@19:
    #   3 x in 7 tokens, 3 in 12, 8 in 20.
    # Sample 1: "qqq a ки\nxx ки" -> q q q _ a _ ки@6 \n x x _ ки@11: no x in 7, 2 x in 12.
    expected = [[shepherd_p(3 / 7), shepherd_p(3 / 12), shepherd_p(8 / 20)], [shepherd_p(0.0), shepherd_p(2 / 12)]]
    assert out.char_ends == [RESPONSE_ENDS, [3, 5]]
    for got, want in zip(out.scores, expected):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    # f = 0 gives z_3 = 0 and z_0 = C / sqrt((C² + A²)/D + eps): p(+) = sigmoid(-V * z_0) < 1/2.
    assert out.scores[1][0] == pytest.approx(sigmoid(-V * C / math.sqrt((C**2 + A**2) / D + EPS)), rel=1e-5)


# ---- alignment: the step token inside a step, truncation, batching, padding, round trip

def test_step_token_inside_a_step_is_not_scored(qwen_path):
    prm = ProcessRewardModel(str(qwen_path), convention="qwen", system_prompt="s")
    out = prm.score_steps(["q"], ["x<extra_0>x\n\nab"])
    # Content "x<extra_0>x<extra_0>ab<extra_0>": the first <extra_0> (@30) is the policy's own text, not
    # ours: ours are @32 (2 x in 33 tokens) and @35 (2 x in 36). Two steps, two scores.
    assert out.char_ends == [[13, 15]]
    assert out.scores[0] == pytest.approx([qwen_p(2 / 33), qwen_p(2 / 36)], rel=1e-5, abs=1e-7)


def test_truncated_prm_input_scores_the_steps_it_kept(qwen_path, caplog):
    full = ProcessRewardModel(str(qwen_path), convention="qwen", system_prompt="s").score_steps(["q"], [RESPONSE])
    prm = ProcessRewardModel(str(qwen_path), convention="qwen", system_prompt="s", max_length=40)
    out = prm.score_steps(["q", "q"], [RESPONSE, "ab"])
    # Tokens 0..39 keep the step tokens @32 and @35 but not @41: step 3 is dropped, and counted.
    assert out.char_ends == [RESPONSE_ENDS[:2], [2]]
    assert out.num_unscored == [1, 0]
    assert out.scores[0] == pytest.approx(full.scores[0][:2], rel=1e-6)
    assert "cut off 1 steps in 1 of 2 samples" in caplog.text


@pytest.mark.parametrize("convention", ["qwen", "shepherd"])
def test_batch_equals_one_by_one_with_padding(convention, qwen_path, shepherd_path):
    path = str(qwen_path if convention == "qwen" else shepherd_path)
    prompts = ["q", "a much longer question", "q", "qq"]
    responses = [RESPONSE, "x\n\nxa\n\naax\n\nb", "", "single step xx"]
    batched = ProcessRewardModel(path, convention=convention, batch_size=8).score_steps(prompts, responses)
    alone = ProcessRewardModel(path, convention=convention, batch_size=1).score_steps(prompts, responses)
    assert batched.char_ends == alone.char_ends == [RESPONSE_ENDS, [3, 7, 12, 13], [], [14]]
    assert batched.scores[2] == []
    for got, want in zip(batched.scores, alone.scores):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("convention", ["qwen", "shepherd"])
def test_save_and_load_round_trip_matches_the_model_in_memory(convention, tmp_path):
    model, tok = build_tiny_prm(char_tokenizer(), convention=convention, seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prm = ProcessRewardModel(str(tmp_path), convention=convention, system_prompt="s")
    got = prm.score_steps(["q"], [RESPONSE]).scores[0]
    # The same input by hand (module docstring of rewards.prm), scored by the in-memory model.
    if convention == "qwen":
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "xxx<extra_0>ab<extra_0>xxxxx<extra_0>"}]
        ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids
        step_id = tok.convert_tokens_to_ids("<extra_0>")
        with torch.no_grad():
            probs = model(torch.tensor([ids])).logits.softmax(-1)[0, :, 1]
    else:
        ids = tok("q xxx ки\nab ки\nxxxxx ки").input_ids
        step_id = tok.convert_tokens_to_ids("ки")
        pair = [tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")]
        with torch.no_grad():
            probs = model(torch.tensor([ids])).logits[0][:, pair].softmax(-1)[:, 0]
    want = probs[torch.tensor(ids) == step_id].tolist()
    assert len(want) == 3
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert 0.0 < min(got) and max(got) < 1.0


def test_offload_on_cpu_is_a_no_op_and_bfloat16_loads(qwen_path):
    ref = ProcessRewardModel(str(qwen_path), system_prompt="s").score_steps(["q"], [RESPONSE]).scores[0]
    prm = ProcessRewardModel(str(qwen_path), system_prompt="s", offload=False, dtype="bfloat16")
    got = prm.score_steps(["q"], [RESPONSE]).scores[0]
    assert next(prm.model.parameters()).device.type == "cpu"
    assert next(prm.model.parameters()).dtype == torch.bfloat16
    assert got == pytest.approx(ref, abs=2e-2)


def test_end_to_end_step_ends_on_char_tokenizer_policy_tokens(qwen_path):
    # A char-tokenizer policy cannot write "\n\n" (see test_steps), so its steps are separated by "|".
    policy = char_tokenizer()
    response = "xxx|ab|xxxxx"
    token_ids = policy(response).input_ids + [policy.eos_token_id]
    text = policy.decode(token_ids, skip_special_tokens=True)
    out = ProcessRewardModel(str(qwen_path), system_prompt="s", separator="|").score_steps(["q"], [text])
    assert out.char_ends == [[4, 7, 12]]
    # One token per character: step j ends on token char_end - 1; the EOS is no step's end.
    assert step_end_tokens(lambda ids: policy.decode(ids, skip_special_tokens=True), token_ids, out.char_ends[0]) \
        == [3, 6, 11]
    # The PRM input is the same as for "\n\n"-separated steps: the PRM's own separator replaces the policy's.
    assert out.scores[0] == pytest.approx([qwen_p(3 / 33), qwen_p(3 / 36), qwen_p(8 / 42)], rel=1e-5, abs=1e-7)


def test_shepherd_without_logits_to_keep_gives_the_same_scores(shepherd_path):
    # A remote-code causal LM may not take logits_to_keep: then the full (B, T, V) logits are sliced.
    prm = ProcessRewardModel(str(shepherd_path), convention="shepherd")
    assert prm._keeps_logits
    want = prm.score_steps(["q", "qqq"], [RESPONSE, "a\n\nxx"]).scores
    prm._keeps_logits = False
    for got, ref in zip(prm.score_steps(["q", "qqq"], [RESPONSE, "a\n\nxx"]).scores, want):
        assert got == pytest.approx(ref, rel=1e-6)


# ---- errors

def test_missing_step_token_is_a_clear_error(tmp_path):
    model, _ = build_tiny_prm(char_tokenizer(), convention="qwen")
    model.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)  # the policy tokenizer, without <extra_0>
    with pytest.raises(ValueError, match=r"step_token='<extra_0>' is not a single token"):
        ProcessRewardModel(str(tmp_path), convention="qwen")


@pytest.mark.parametrize("arg", ["step_tag", "good_token", "bad_token"])
def test_multi_token_shepherd_tokens_are_clear_errors(arg, shepherd_path):
    with pytest.raises(ValueError, match=rf"{arg}='ab' is not a single token"):
        ProcessRewardModel(str(shepherd_path), convention="shepherd", **{arg: "ab"})


def test_non_ascii_unknown_single_id_is_not_a_token(shepherd_path):
    # The char tokenizer maps "é" to its unknown id (EOS): one id, but not that token.
    with pytest.raises(ValueError, match=r"good_token='é'"):
        ProcessRewardModel(str(shepherd_path), convention="shepherd", good_token="é")


def test_qwen_on_a_model_without_a_token_head_needs_trust_remote_code(shepherd_path):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        ProcessRewardModel(str(shepherd_path), convention="qwen", step_token="ки")


def test_merged_step_token_raises(qwen_path):
    prm = ProcessRewardModel(str(qwen_path), system_prompt="s")
    # Offsets as a tokenizer that merged our step token (chars 3..12) into one token with text would give.
    with pytest.raises(ValueError, match="sample 4 step 0: the inserted step token '<extra_0>' was tokenized"):
        prm._step_positions([7, 8], [(0, 3), (3, 13)], [12], 4)


def test_bad_arguments(qwen_path, tmp_path):
    with pytest.raises(ValueError, match="convention='orm'"):
        ProcessRewardModel(str(qwen_path), convention="orm")
    with pytest.raises(ValueError, match="dtype='fp8'"):
        ProcessRewardModel(str(qwen_path), dtype="fp8")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ProcessRewardModel(str(tmp_path))
    prm = ProcessRewardModel(str(qwen_path))
    with pytest.raises(ValueError, match="2 prompts and 1 responses"):
        prm.score_steps(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="convention='x'"):
        build_tiny_prm(char_tokenizer(), convention="x")


# ---- aggregate

AGGREGATE_CASES = {
    # steps [0.5, 0.25, 0.8]: min 0.25; last 0.8; mean 1.55/3; product 0.5 * 0.25 * 0.8 = 0.1
    "min": 0.25,
    "last": 0.8,
    "mean": 1.55 / 3,
    "product": 0.1,
}


@pytest.mark.parametrize("how", sorted(AGGREGATIONS))
def test_every_aggregation_by_hand(how):
    assert how in AGGREGATE_CASES, f"aggregation {how!r} is registered but has no numeric test"
    assert aggregate([0.5, 0.25, 0.8], how) == pytest.approx(AGGREGATE_CASES[how], rel=1e-12)
    assert aggregate([0.7], how) == pytest.approx(0.7, rel=1e-12)
    assert aggregate([], how) == 0.0  # no steps: no credit


def test_unknown_aggregation_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: min, last, mean, product"):
        aggregate([0.5], "max")

