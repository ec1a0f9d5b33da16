"""Model and tokenizer loading: any local Hugging Face causal LM, or a tiny built-in one.

Nothing is ever downloaded: `load_model` passes `local_files_only=True`, and the built-in path
builds a random-init Qwen2/Llama-shaped model from a config plus a character tokenizer made here.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

PAD, EOS = "<pad>", "<eos>"
# A chat template for the character tokenizer, so `data.apply_chat_template=true` works on tiny models.
CHAR_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, built locally (no download).

    Every character is one token, so arithmetic answers tokenise digit by digit.
    """
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {PAD: 0, EOS: 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
    # One token per char; [\s\S], not ".", which skips newlines and turned "\n\n" into one unknown token.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join without spaces
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
    hf.chat_template = CHAR_CHAT_TEMPLATE
    return hf


def tiny_model(
    vocab_size: int,
    *,
    family: str = "qwen2",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 344,
    max_positions: int = 512,
    seed: int = 0,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
) -> PreTrainedModel:
    """A random-init Qwen2- or Llama-shaped causal LM with tied embeddings (fixed seed)."""
    config_cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}.get(family)
    if config_cls is None:
        raise ValueError(f"model.tiny.family={family!r}: expected 'qwen2' or 'llama'")
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.eos_token_id = eos_token_id
    return model


def load_model(path: str, *, dtype: str, trust_remote_code: bool) -> PreTrainedModel:
    """Load a local Hugging Face causal LM; fails with the path named if it is not one."""
    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(
            f"model.path={path!r}: no config.json there; point model.path at a local Hugging Face "
            "checkpoint folder (nothing is downloaded)"
        )
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, local_files_only=True
    )


def load_tokenizer(path: str, *, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer as saved (see rewards.prm.load_tokenizer: AutoTokenizer would give a
    saved char tokenizer qwen2's own class, which drops whitespace), with a pad token."""
    from rewards.prm import load_tokenizer as load_saved_tokenizer

    tok = load_saved_tokenizer(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # many base models ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok
