"""split_steps spans and step_end_tokens on a byte-level BPE, the char tokenizer and a toy vocabulary."""

import itertools

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rewards.steps import split_steps, step_end_tokens
from rlcore.models import char_tokenizer


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE trained here on a few strings; no pre-tokenizer regex, so "\\n\\n" merges with text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["First we add.\n\nThen we carry.\n\nThe answer is 4.\n\n", "So x = 3.\n\nThe end.\n\nThe sum is 7.\n\n",
              "We know 2 + 2 = 4.\n\nThen 4 + 3 = 7.\n\nThe answer is 7."] * 20
    trainer = trainers.BpeTrainer(vocab_size=290, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def byte_oracle(tok: Tokenizer, ids: list[int], text: str, ends: list[int]) -> list[int]:
    """Reference by bytes, not decodes: ByteLevel maps each byte to one symbol, so a token's byte
    length is the length of its vocabulary string; char end e is byte len(text[:e].encode())."""
    cum_bytes = list(itertools.accumulate(len(tok.id_to_token(i)) for i in ids))
    return [next(i for i, c in enumerate(cum_bytes) if c >= len(text[:e].encode())) for e in ends]


# ---- split_steps

@pytest.mark.parametrize(
    ("response", "spans"),
    [
        ("a\n\nbc\n\nd", [(0, 3), (3, 7), (7, 8)]),
        ("a\n\nbc\n\n", [(0, 3), (3, 7)]),  # trailing separator: no extra step
        ("", []),
        ("one step only", [(0, 13)]),
        ("a\n\n  \n\nb", [(0, 3), (7, 8)]),  # whitespace-only step dropped
        ("\n\na", [(2, 3)]),  # leading separator: empty first step dropped
        ("a\n\n\nb", [(0, 3), (3, 5)]),  # the odd third newline starts the next step
        ("   ", []),
    ],
)
def test_split_steps(response, spans):
    assert split_steps(response) == spans


def test_split_steps_custom_separator_and_empty_separator():
    assert split_steps("x\ny\n", separator="\n") == [(0, 2), (2, 4)]
    with pytest.raises(ValueError, match="separator"):
        split_steps("x", separator="")


# ---- step_end_tokens on a byte-level BPE

def test_bpe_separator_merged_into_neighbouring_tokens(bpe):
    text = "First we add.\n\nThen we carry.\n\nThe answer is 4."
    ids = bpe.encode(text).ids
    pieces = [bpe.decode([i]) for i in ids]
    # The tokenizer really merges the separator with text on both sides ("add.\n\nTh").
    assert any("\n\n" in p and p.strip() for p in pieces)
    ends = [e for _, e in split_steps(text)]
    got = step_end_tokens(bpe.decode, ids, ends)
    assert got == byte_oracle(bpe, ids, text, ends)
    # Each step ends on the token that carries its "\n\n" (or the last token).
    assert all("\n\n" in bpe.decode([ids[i]]) for i in got[:-1]) and got[-1] == len(ids) - 1


def test_bpe_multibyte_characters_split_across_byte_tokens(bpe):
    text = "Step é.\n\nAnswer 日本"
    ids = bpe.encode(text).ids
    assert bpe.decode(ids[:-1]).endswith("\ufffd")  # 本 is split into byte tokens
    ends = [e for _, e in split_steps(text)]
    got = step_end_tokens(bpe.decode, ids, ends)
    # The last step ends with 本 (3 byte tokens): its LAST byte token, not the first one, where
    # the prefix decode "...日\ufffd" is already long enough.
    assert got == byte_oracle(bpe, ids, text, ends) == [ids.index(bpe.token_to_id(".ĊĊ")), len(ids) - 1]


def test_bpe_truncated_mid_step_and_trailing_separator(bpe):
    full = "First we add.\n\nThen we carry.\n\nThe answer is 4.\n\n"
    ids = bpe.encode(full).ids
    # Trailing separator: the last step ends on the token carrying the final "\n\n".
    ends = [e for _, e in split_steps(full)]
    assert len(ends) == 3
    assert step_end_tokens(bpe.decode, ids, ends) == byte_oracle(bpe, ids, full, ends)
    # Truncated mid-step (max_tokens hit): the unfinished last step ends on the last token.
    cut = ids[:-1]
    text = bpe.decode(cut)
    assert text.endswith("The answer is ")
    ends = [e for _, e in split_steps(text)]
    got = step_end_tokens(bpe.decode, cut, ends)
    assert got == byte_oracle(bpe, cut, text, ends) and got[-1] == len(cut) - 1 and len(got) == 3


def test_bpe_truncated_step_inside_the_separator_token_is_dropped(bpe):
    # Cut after ".\n\nThe answer": the whole unfinished step 3 sits in the token that ends step 2,
    # so it has no token of its own: indices stay strictly increasing and step 3 is dropped.
    ids = bpe.encode("First we add.\n\nThen we carry.\n\nThe answer is 4.\n\n").ids
    cut = ids[:-2]
    text = bpe.decode(cut)
    assert text.endswith(".\n\nThe answer") and bpe.decode(cut[-1:]) == ".\n\nThe answer"
    ends = [e for _, e in split_steps(text)]
    assert len(ends) == 3
    oracle = byte_oracle(bpe, cut, text, ends)
    assert oracle[1] == oracle[2] == len(cut) - 1
    assert step_end_tokens(bpe.decode, cut, ends) == oracle[:2]


def test_bpe_no_separator_and_empty_response(bpe):
    text = "The answer is 4"
    ids = bpe.encode(text).ids
    assert step_end_tokens(bpe.decode, ids, [e for _, e in split_steps(text)]) == [len(ids) - 1]
    assert step_end_tokens(bpe.decode, [], []) == []
    assert step_end_tokens(bpe.decode, [], [3]) == []  # zero tokens, whatever the ends


# ---- step_end_tokens on the char tokenizer (one token per character)
# Its pre-tokenizer regex "." does not match newlines, so a run of them is one chunk: "\n" is in the
# vocabulary but "\n\n" maps to the unknown id (EOS). A char-tokenizer policy cannot write "\n\n",
# so these tests separate steps with "|".

def test_char_tokenizer_special_tokens_are_skipped():
    tok = char_tokenizer()
    response = "ab|cd|e"
    ids = tok(response).input_ids + [tok.eos_token_id]  # generation ends with EOS

    def decode(x):
        return tok.decode(x, skip_special_tokens=True)

    ends = [e for _, e in split_steps(decode(ids), separator="|")]
    assert ends == [3, 6, 7]
    # Char e-1 is token e-1; the EOS carries no character, so the last step ends on "e".
    assert step_end_tokens(decode, ids, ends) == [2, 5, 6]


def test_decode_count_is_logarithmic():
    tok = char_tokenizer()
    text = "|".join(["x" * 199] * 5)  # 999 tokens, 5 steps
    ids = tok(text).input_ids
    calls = []

    def decode(x):
        calls.append(len(x))
        return tok.decode(x)

    ends = [e for _, e in split_steps(text, separator="|")]
    assert step_end_tokens(decode, ids, ends) == [e - 1 for e in ends]
    assert len(calls) <= 1 + len(ends) * 10  # ceil(log2(999)) = 10 per step, plus the full decode


# ---- collisions, clamping and bad input (toy concatenative vocabulary)

PIECES = ["a\n\nb\n\n", "c", "\n\n", "d"]


def toy_decode(ids: list[int]) -> str:
    return "".join(PIECES[i] for i in ids)


def test_two_step_ends_in_one_token_move_forward_then_drop():
    # "a\n\n" and "b\n\n" both end inside token 0: step 2 moves to token 1.
    assert step_end_tokens(toy_decode, [0, 1, 2, 3], [3, 6, 9, 10]) == [0, 1, 2, 3]
    # Only one token: step 2 has no token left and is dropped.
    assert step_end_tokens(toy_decode, [0], [3, 6]) == [0]


def test_ends_past_the_text_clamp_to_last_token():
    # Text "c\n\nd" (4 chars); ends 5 and 6 lie beyond it: the first clamps to token 2, the second is dropped.
    assert step_end_tokens(toy_decode, [1, 2, 3], [3, 5, 6]) == [1, 2]


@pytest.mark.parametrize("ends", [[3, 3], [5, 2], [0]])
def test_ends_must_increase(ends):
    with pytest.raises(ValueError, match="strictly increasing"):
        step_end_tokens(toy_decode, [0, 1], ends)
