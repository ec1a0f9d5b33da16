"""LoRA adapters (peft) on the actor: the adapters train, the base weights stay frozen.

- The reference policy is the same model with its adapters disabled (`Trainer._ref_logprobs`): no
  second copy of the base weights.
- The weight sync and the merged export send W + (alpha / r) B A under the base model's own names
  (`merged_state`), one tensor at a time; the rollout engine never sees an adapter. (An engine with
  native LoRA could take the adapters alone; the hf engine does not.)
- The export writes merged weights (model.lora.export=merged, loads with from_pretrained anywhere) or
  the adapter alone (model.lora.export=adapter: adapter_config.json + adapter_model.safetensors, for
  PeftModel.from_pretrained over the base checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

PREFIX = "base_model.model."  # where peft puts the wrapped model's own names


def apply_lora(model, lora_cfg):
    """Wrap `model` with trainable LoRA adapters on lora_cfg.targets (base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=list(lora_cfg.targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_lora(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


@torch.no_grad()
def merged_state(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(base model name, tensor) with each adapted weight merged: W + delta, computed when yielded.

    Parameters that no adapter touches are yielded as they are (the same Parameter objects), so tied
    embeddings still arrive as one tensor under both names.
    """
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer") and leaf == "weight" and owner[: -len(".base_layer")] in layers:
            layer = layers[owner[: -len(".base_layer")]]
            tensor = tensor.detach() + layer.get_delta_weight(adapter).to(tensor.dtype)
        yield name.removeprefix(PREFIX).replace(".base_layer.", "."), tensor


def merged_model(model):
    """A plain transformers model with the merged weights, assigned into a meta skeleton: adapted
    weights are new tensors, the others are shared with `model` (no copy)."""
    from transformers import AutoModelForCausalLM

    base = model.get_base_model()
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(base.config, dtype=base.dtype)
    plain.load_state_dict({n: t.detach() for n, t in merged_state(model)}, assign=True)
    plain.tie_weights()
    for name, buf in base.named_buffers():  # rotary inv_freq and other buffers outside the state dict
        owner, _, leaf = name.rpartition(".")
        target = plain.get_submodule(owner) if owner else plain
        if getattr(target, leaf).is_meta:
            target.register_buffer(leaf, buf.detach().clone(), persistent=False)
    plain.generation_config = base.generation_config
    return plain.eval()
