"""Model and tokenizer loading: any local Hugging Face causal LM, or a tiny built-in one.

Nothing is ever downloaded: `load_model` passes `local_files_only=True`, and the built-in path
builds a random-init dense or MoE model (models.FAMILIES) from a config plus a character tokenizer made here.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    LlamaConfig,
    MixtralConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3MoeConfig,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

PAD, EOS = "<pad>", "<eos>"
# A chat template for the character tokenizer, so `data.apply_chat_template=true` works on tiny models.
CHAR_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# Printable ASCII without the vertical tab, form feed and carriage return.
CHAR_ALPHABET = [c for c in string.printable if c not in "\x0b\x0c\r"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, built locally (no download).

    Every character is one token, so arithmetic answers tokenise digit by digit. It is a byte-level
    BPE without merges, normalised with NFC: exactly the pipeline transformers' Qwen2Tokenizer
    rebuilds from a saved tokenizer.json, which `AutoTokenizer.from_pretrained` forces on every qwen2
    folder. Saved any other way (a WordLevel model, a plain whitespace split), the export reloaded
    through AutoTokenizer dropped whitespace: "a b" became other ids than in training. Without
    merges each byte is its own token, so the pre-tokenizer's split cannot change the ids.
    Characters outside the alphabet encode to nothing (no unknown token); rlcore.data counts and
    drops prompts holding them.
    """
    to_unicode = bytes_to_unicode()  # the byte -> printable-character map of byte-level BPE
    vocab = {PAD: 0, EOS: 1, **{to_unicode[ord(c)]: i + 2 for i, c in enumerate(CHAR_ALPHABET)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
    # Saved as "unk_token": null: Qwen2Tokenizer would otherwise add "<|endoftext|>" as a 100th token.
    hf.init_kwargs["unk_token"] = None
    hf.chat_template = CHAR_CHAT_TEMPLATE
    return hf


def is_legacy_char_tokenizer(tok: PreTrainedTokenizerBase) -> bool:
    """The char tokenizer as rlcore saved it before the byte-level form (a WordLevel vocabulary over
    the raw characters); same ids, but AutoTokenizer reloads it without whitespace."""
    return tok.get_vocab() == {PAD: 0, EOS: 1, **{c: i + 2 for i, c in enumerate(CHAR_ALPHABET)}}


FAMILIES = ("qwen2", "llama", "qwen3_moe", "mixtral", "deepseek_v3")
MOE_FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3")


def tiny_model(
    vocab_size: int,
    *,
    family: str = "qwen2",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 344,
    num_experts: int = 8,
    experts_per_token: int = 2,
    expert_intermediate_size: int = 64,
    max_positions: int = 512,
    seed: int = 0,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
) -> PreTrainedModel:
    """A random-init causal LM with tied embeddings (fixed seed): dense Qwen2 or Llama, or MoE.

    MoE families: Qwen3-MoE (softmax top-k, every layer sparse), Mixtral (softmax top-k, renormalised)
    and DeepSeek-V3 (sigmoid scores, group-limited top-k over 2 groups, one shared expert, MLA
    attention, layer 0 dense as in the real model's first_k_dense_replace). `intermediate_size` is the
    dense MLP width (Qwen3-MoE / DeepSeek-V3 dense layers); `expert_intermediate_size` each expert's.
    """
    if family not in FAMILIES:
        raise ValueError(f"model.tiny.family={family!r}: expected one of {', '.join(FAMILIES)}")
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=max_positions, tie_word_embeddings=True, pad_token_id=pad_token_id,
                  eos_token_id=eos_token_id, bos_token_id=None)
    head_dim = hidden_size // num_heads
    if family == "qwen2":
        config = Qwen2Config(intermediate_size=intermediate_size, **common)
    elif family == "llama":
        config = LlamaConfig(intermediate_size=intermediate_size, **common)
    elif family == "qwen3_moe":
        config = Qwen3MoeConfig(intermediate_size=intermediate_size, moe_intermediate_size=expert_intermediate_size,
                                num_experts=num_experts, num_experts_per_tok=experts_per_token, head_dim=head_dim,
                                norm_topk_prob=True, **common)
    elif family == "mixtral":
        config = MixtralConfig(intermediate_size=expert_intermediate_size, num_local_experts=num_experts,
                               num_experts_per_tok=experts_per_token, **common)
    else:  # deepseek_v3: multi-head latent attention, so every head has its own K/V
        config = DeepseekV3Config(
            intermediate_size=intermediate_size, moe_intermediate_size=expert_intermediate_size,
            n_routed_experts=num_experts, num_experts_per_tok=experts_per_token, n_shared_experts=1,
            n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.0, norm_topk_prob=True,
            q_lora_rank=hidden_size // 2, kv_lora_rank=hidden_size // 4, qk_rope_head_dim=head_dim // 2,
            qk_nope_head_dim=head_dim // 2, v_head_dim=head_dim, rope_interleave=False,
            **(common | {"num_key_value_heads": num_heads}))
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
    if is_legacy_char_tokenizer(tok):  # an older checkpoint: the same ids, in the form that round-trips
        return char_tokenizer()
    if tok.pad_token is None:  # many base models ship without one; padding is masked anyway
        tok.pad_token = tok.eos_token
    return tok
