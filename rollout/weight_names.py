"""Checkpoint-format weight names: what `save_pretrained` writes and `from_pretrained` / vLLM load.

transformers 5 holds the routed experts of an MoE layer fused: `...mlp.experts.gate_up_proj`
[E, 2I, H] (gate rows first, then up) and `...mlp.experts.down_proj` [E, H, I]. Checkpoints, and
vLLM's loaders for DeepSeek-V2/V3 and Mixtral, name them per expert (spec/vllm.md, "MoE expert
weights"):

    Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, ...   mlp.experts.{e}.gate_proj.weight / up_proj / down_proj
    Mixtral                                  block_sparse_moe.experts.{e}.w1.weight / w3 / w2,
                                             and block_sparse_moe.gate.weight for the router

Every other tensor keeps its module name. The weight sync sends these names, and the `hf` engine
maps them back onto its own fused parameters, so the path vLLM needs is the one tested on CPU.
tests/rollout/test_weight_names.py checks the mapping against transformers' own save format.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Model types whose checkpoints use Mixtral's expert names (transformers' conversion_mapping.py).
MIXTRAL_NAMES = {"mixtral", "minimax"}


def checkpoint_tensors(name: str, tensor: torch.Tensor, model_type: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, view of `tensor`) pairs for one tensor of `model.state_dict()`.

    The views share storage with `tensor`: nothing is copied, and copying into a view writes the
    fused parameter in place (how the `hf` engine loads per-expert tensors).
    """
    mixtral = model_type in MIXTRAL_NAMES
    if mixtral:  # the whole sparse block (router and experts) keeps its old module name
        name = name.replace(".mlp.", ".block_sparse_moe.")
    fused_gate_up = name.endswith(".experts.gate_up_proj") and tensor.dim() == 3
    fused_down = name.endswith(".experts.down_proj") and tensor.dim() == 3
    if not (fused_gate_up or fused_down):
        yield name, tensor
        return
    prefix = name.rsplit(".", 1)[0]  # "...mlp.experts"
    if fused_gate_up:
        gate, up = tensor.chunk(2, dim=1)
        gate_name, up_name = ("w1", "w3") if mixtral else ("gate_proj", "up_proj")
        for e in range(tensor.shape[0]):
            yield f"{prefix}.{e}.{gate_name}.weight", gate[e]
            yield f"{prefix}.{e}.{up_name}.weight", up[e]
    else:
        down_name = "w2" if mixtral else "down_proj"
        for e in range(tensor.shape[0]):
            yield f"{prefix}.{e}.{down_name}.weight", tensor[e]


def checkpoint_state(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under checkpoint names, one view at a time (no copies)."""
    model_type = model.config.model_type
    for name, tensor in model.state_dict().items():
        yield from checkpoint_tensors(name, tensor.detach(), model_type)
