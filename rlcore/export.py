"""The self-checking Hugging Face export: weights, tokenizer and chat template as trained.

`export_hf` writes into a temporary folder, reloads it the way a user will (`from_pretrained`,
`AutoTokenizer.from_pretrained`) and puts it in place only when the reload behaves as the trained
model: the same logits on a few tokens, the same token ids for a sample of training prompts and
responses (whitespace included), and the same chat-template output. Weights are checked finite first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from rlcore import dist
from rlcore.guard import check_finite_weights

# Always among the texts the tokenizer check encodes: spaces, tabs, newlines, digits, punctuation.
PROBE_TEXTS = ("1 + 2 =", "a b\nc", "  two  spaces,\ta tab\n\nand (x) = 12*3-4/5;")


def _untied(model):
    """A copy of a tied model with the head as a tensor of its own (same values): what a model class that
    never ties (vLLM's DeepSeek) needs in the files. Only small models are tied this way (rlcore's tiny)."""
    import copy

    untied = copy.deepcopy(model)
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.get_input_embeddings().weight.detach().clone())
    return untied


def export_hf(model, tokenizer, out_dir: Path, *, atol: float | None = None, lora_export: str = "merged",
              probe_texts: list[str] = (), trust_remote_code: bool = False) -> float:
    """Write a Hugging Face folder and check it: reload it and compare logits on a few tokens, and the
    tokenizer's ids for `probe_texts` (a sample of training prompts and responses) plus PROBE_TEXTS
    and its chat template's output against `tokenizer`'s.

    Refuses to write into an existing non-empty folder, or weights holding NaN or inf (NonFiniteError).
    Returns the max |logit difference|.
    A sharded model is gathered to rank 0 (the other ranks hold no copy; rank 0 one full copy on CPU,
    assigned into a model skeleton without copying); only rank 0 writes, and all ranks get the diff.
    A LoRA model is written merged (checked against the adapted model's own logits) or, with
    lora_export="adapter", as the adapter alone (reloaded over the base weights for the check).
    """
    from transformers import AutoModelForCausalLM

    from rlcore.lora import is_lora, merged_model
    from rollout.vllm_engine import UNTIED_HEAD_TYPES, vllm_readable

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"export folder {str(out_dir)!r} exists and is not empty; choose another one")
    check_finite_weights(f"the export {str(out_dir)!r}", model)  # every rank checks its shards
    if dist.active():
        model = _gather_to_main(model)
    diff = 0.0
    if dist.is_main():
        tmp = out_dir.with_name(f".tmp_{out_dir.name}_{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        adapted = model if is_lora(model) else None
        if adapted is not None and lora_export == "merged":
            model = merged_model(adapted)
        if model.config.model_type in UNTIED_HEAD_TYPES and model.config.tie_word_embeddings:
            model = _untied(model)  # vLLM would not tie them (real DeepSeek checkpoints are untied)
        vllm_readable(model.config)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if adapted is not None and lora_export == "adapter":
            reloaded = _reload_adapter(adapted, tmp)
            diff = _max_logit_diff(adapted, reloaded)
        else:
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=model.dtype, local_files_only=True)
            diff = _max_logit_diff(model, reloaded)  # the file against what was written: exact
            if adapted is not None:  # merged W + sBA against x W + s (x A) B: equal up to fp rounding
                merge = _max_logit_diff(adapted, reloaded)
                if not merge <= 1e-3:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise RuntimeError(f"export check failed: merged LoRA logits differ from the adapted model's "
                                       f"by {merge:.3g} (> 1e-3)")
        tol = atol if atol is not None else (1e-5 if model.dtype == torch.float32 else 1e-2)
        if not diff <= tol:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"export check failed: reloaded logits differ by {diff:.3g} (> {tol:g})")
        problem = tokenizer_mismatch(tokenizer, tmp, [*probe_texts, *PROBE_TEXTS], trust_remote_code)
        if problem is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"export check failed: {problem}; a user of the export would not tokenize the way "
                               "the model was trained")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    return float(dist.all_reduce(torch.tensor([diff]), "max").item())


def _reload_adapter(adapted, folder: Path):
    """The saved adapter over a copy of the base weights (what a user does with the base checkpoint)."""
    import copy

    from peft import PeftModel

    base = copy.deepcopy(adapted).unload()  # the base weights, adapters removed
    return PeftModel.from_pretrained(base, folder)


def _gather_to_main(model):
    """A plain copy of a sharded model on rank 0 (None elsewhere): the full state dict is gathered to
    rank 0's CPU and assigned into a meta-device skeleton, so rank 0 holds one full copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main():
        return None
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
    plain.load_state_dict(full, assign=True)
    plain.tie_weights()
    # Buffers outside the state dict (rotary inv_freq): FSDP does not shard buffers, so take them as is.
    for name, buf in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        target = plain.get_submodule(owner) if owner else plain
        if getattr(target, leaf).is_meta:
            target.register_buffer(leaf, buf.detach().cpu().clone(), persistent=False)
    plain.generation_config = model.generation_config
    return plain.eval()


@torch.no_grad()
def _max_logit_diff(model, reloaded) -> float:
    device = next(model.parameters()).device
    ids = torch.arange(min(16, model.config.vocab_size), device=device)[None] % model.config.vocab_size
    was_training = model.training
    model.eval()
    a = model(input_ids=ids).logits.float()
    b = reloaded.to(device).eval()(input_ids=ids).logits.float()
    model.train(was_training)
    return (a - b).abs().max().item()


def tokenizer_mismatch(tokenizer, folder: Path, texts: list[str], trust_remote_code: bool = False) -> str | None:
    """How AutoTokenizer.from_pretrained(folder) differs from `tokenizer`: the first text whose ids
    differ (with and without special tokens), or the chat template's output; None when they agree."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
    name = f"AutoTokenizer.from_pretrained loads {type(reloaded).__name__}, which"
    for text in dict.fromkeys(texts):
        for special in (False, True):
            ours = tokenizer(text, add_special_tokens=special)["input_ids"]
            theirs = reloaded(text, add_special_tokens=special)["input_ids"]
            if ours != theirs:
                return (f"{name} encodes {text[:80]!r} as {theirs[:24]} where training used {ours[:24]}"
                        + ("" if special else " (without special tokens)"))
    ours, theirs = _chat_output(tokenizer, texts), _chat_output(reloaded, texts)
    if ours != theirs:
        return f"{name} renders the chat template as {theirs!r} where training rendered {ours!r}"
    return None


def _chat_output(tokenizer, texts: list[str]) -> tuple[str, list[int]] | str | None:
    """The chat template applied to a short conversation (text and ids), the error it raised, or None
    without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    conversation = [{"role": "user", "content": texts[0]}, {"role": "assistant", "content": texts[-1]},
                    {"role": "user", "content": "a b\nc"}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template may reject the roles; it must reject them alike
        return f"{type(e).__name__}: {e}"
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]
