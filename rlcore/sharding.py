"""FSDP2 sharding of the actor, critic and reference across the ranks (trainer.nproc > 1).

`fully_shard` on every decoder layer, then on the root module (the ResponseScorer around the actor or
reference, the value model itself for the critic):

    zero3      parameters sharded; each layer gathers for its forward and backward and frees after
    zero2      parameters sharded at rest; gathered in forward and kept through backward
    replicate  every rank keeps whole parameters (HSDP with a shard group of one): DDP semantics

FSDP averages gradients over ranks, while every rank's loss is already normalised by the global token
/ sequence counts of the mini-batch (their sum is the mini-batch loss): so the actor and critic scale
their backward by the rank count, which makes the averaged gradient the summed one,
whatever the rank count. (A gradient divide factor of 1 would say the same, but gloo has no
pre-multiplied sum.) `trainer.offload` keeps parameters, gradients and
optimizer state in CPU memory (FSDP2's CPUOffloadPolicy; CUDA only). `trainer.mixed_precision`
computes in bf16 and reduces gradients in fp32 over fp32 master weights.
"""

from __future__ import annotations

import torch
from torch import nn

STRATEGIES = ("zero3", "zero2", "replicate")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (its `_no_split_modules` classes), in order."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules); cannot shard it")
    return layers


def shard(root: nn.Module, model: nn.Module, *, strategy: str, device: str, offload: bool = False,
          mixed_precision: bool = False) -> nn.Module:
    """fully_shard each decoder layer of `model`, then `root` (which contains `model`); in place."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if strategy not in STRATEGIES:
        raise ValueError(f"trainer.sharding={strategy!r} is not one of {STRATEGIES}")
    world = dist.get_world_size()
    if strategy == "replicate":
        mesh = init_device_mesh(device, (world, 1), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device, (world,))
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": strategy == "zero3",
        "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
        "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision else MixedPrecisionPolicy(),
    }
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)
    return root


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter: all-gathers a DTensor (a collective every
    rank must call in the same order); a plain tensor is returned as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def scalar(t) -> float:
    """A Python float of a (possibly DTensor) scalar, e.g. clip_grad_norm_'s total norm."""
    return float(full_tensor(t)) if isinstance(t, torch.Tensor) else float(t)
