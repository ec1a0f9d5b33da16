"""What the ``vllm`` engine runs inside vLLM's worker, next to vLLM's model (``collective_rpc`` /
``apply_model``; in-process: plain calls): the weight reload with its CPU workarounds, and the sync
checksums of what each layer computes with. Imports vLLM inside the functions only.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .base import checksum, fold, probe


def reload(worker, weights: Iterator[tuple[str, torch.Tensor]]) -> list[str]:
    """Run in the worker by collective_rpc (in-process: a plain call): GPUModelRunner.reload_weights'
    checkpoint-format path (model_executor/model_loader/reload), inside set_current_vllm_config as 0.26's
    Worker.reload_weights omits it, plus the check of load_weights' returned names (spec §3). Then the
    post-load processing of layers whose weight is another layer's (a tied LM head): the layerwise reload
    skips them, as nothing is loaded under their name, and on CPU they would keep a packed copy of the
    old embedding. Returns the loadable parameters that got nothing."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    model = worker.get_model()
    with set_current_vllm_config(worker.vllm_config), torch.no_grad():
        # Parameters to load: those of the live model (a tied head counted once) that exist in checkpoint
        # layout too (not the ones post-load processing derives, e.g. MLA's W_UK_T).
        live = {n for n, _ in model.named_parameters()}
        if worker.vllm_config.device_config.device_type == "cpu":
            _forget_cpu_moe_kernels(model)
        initialize_layerwise_reload(model)
        expected = [n for n, _ in model.named_parameters() if n in live]
        loaded = model.load_weights(weights)
        finalize_layerwise_reload(model, worker.vllm_config.model_config)
        for layer in _tied_layers(model):
            layer.quant_method.process_weights_after_loading(layer)
    if loaded is None:
        return []
    return sorted(n for n in expected
                  if n not in loaded and ".experts." not in n and not n.endswith("_scale"))  # kv-cache scales


def has_own_head(model: torch.nn.Module) -> bool:
    """In the worker: vLLM's model has an LM head parameter of its own (not shared with the embedding)."""
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    if head is None:
        return False
    return not any(p is head for name, p in model.named_parameters(remove_duplicate=False)
                   if not name.startswith("lm_head."))


def _forget_cpu_moe_kernels(model: torch.nn.Module) -> None:
    """Make the reload process MoE experts as a first load does. vLLM (0.32 to 0.34 at least,
    UnquantizedFusedMoEMethod._setup_kernel) treats a layer whose kernel exists as a weight update and
    then skips the experts kernel's own post-load step; on CPU that step pads the expert width to 32
    and packs w13/w2 into the grouped-GEMM layout, so an update either failed on the padded shape or
    left the kernel reading plain weights as packed ones (1-2 nats per token off, no error). Without a
    kernel the method pads, packs and builds a new one, and the reload copies the result in place."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if getattr(method, "moe_kernel", None) is not None:
            method.moe_kernel = None


def _tied_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules with a quant_method whose ``weight`` is the very Parameter of an earlier module."""
    owners, tied = {}, []
    for module in model.modules():
        weight = module._parameters.get("weight") if hasattr(module, "quant_method") else None
        if weight is None:
            continue
        if id(weight) in owners:
            tied.append(module)
        owners.setdefault(id(weight), module)
    return tied


def checksums(model: torch.nn.Module, wanted: dict[str, tuple[int, ...]], vocab: int
               ) -> dict[str, tuple[float, float]]:
    """In the worker: checksums of what vLLM computes with, for the checkpoint names in ``wanted``
    (name -> shape). Vocabulary-sized outputs may have padding rows (VocabParallelEmbedding pads to a
    multiple of 64)."""
    packed = getattr(model, "packed_modules_mapping", {})  # e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    out = {}
    for name, shape in wanted.items():
        module_name, _, leaf = name.rpartition(".")
        module, rows = _lookup(model.get_submodule, module_name), None
        if module is None and module_name.count(".") >= 1:  # a slice of a fused layer
            parent, sub = module_name.rsplit(".", 1)
            for fused, parts in packed.items():
                candidate = _lookup(model.get_submodule, f"{parent}.{fused}")
                if sub in parts and hasattr(candidate, "output_sizes"):
                    i, sizes = parts.index(sub), candidate.output_sizes
                    module, rows = candidate, (sum(sizes[:i]), sizes[i])
        if module is None:
            continue
        probed = leaf == "weight" and len(shape) == 2 and _computes_linear(module)
        # the layer's output for the probe vector (W @ probe: what checksum folds), or the tensor itself
        t = _probe_layer(module, shape[1]) if probed else module._parameters.get(leaf)
        if t is None or t.numel() == 0:
            continue
        if rows is not None:
            t = t.narrow(0, *rows)
        if t.shape[0] > vocab and shape[0] == vocab:
            t = t[:vocab]
        if t.shape[0] != shape[0] or (not probed and tuple(t.shape) != shape):
            continue
        out[name] = fold(t) if probed else checksum(t)
    return out


def _computes_linear(module: torch.nn.Module) -> bool:
    """A linear layer or an LM head: used as x @ W.T through quant_method.apply (vLLM's
    LinearBase and ParallelLMHead); an input embedding is a lookup and is read as a tensor."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    return isinstance(module, (LinearBase, ParallelLMHead))


def _probe_layer(module: torch.nn.Module, in_features: int) -> torch.Tensor:
    """The layer's output for the probe vector, bias left out: (out features,) = W @ probe."""
    weight = module._parameters["weight"]
    x = probe(in_features).to(device=weight.device, dtype=weight.dtype)[None]  # (1, K); +-1 is exact
    return module.quant_method.apply(module, x, bias=None)[0]


def _lookup(get, name: str):
    try:
        return get(name)
    except AttributeError:
        return None
