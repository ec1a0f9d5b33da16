"""MoE routers, and the record of which experts each token was routed to during generation.

transformers' MoE families (Qwen2/3-MoE, Mixtral, DeepSeek-V3, ...) route with one router module per
sparse layer that returns ``(router_logits (N, E), top-k weights (N, k), top-k expert ids (N, k))``
for the N = batch x length tokens of a forward pass; the model names that class in
``_can_record_outputs["router_logits"]``. The record follows the convention of vLLM's routed-experts
output (spec §5.3): per sample, ``(positions, layers, k)`` expert ids for every token that was fed to
the model, i.e. the prompt and all generated tokens but the last.
"""

from __future__ import annotations

import re

import torch
from torch import nn

ROUTING_DTYPE = torch.int16  # expert ids; 2 bytes per (token, layer, k)


def routers(model: nn.Module) -> list[nn.Module]:
    """The model's MoE router modules in layer order ([] for a dense model)."""
    spec = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")
    router_cls = getattr(spec, "target_class", None)
    if router_cls is None:
        return []
    return [m for m in model.modules() if isinstance(m, router_cls)]


def router_layers(model: nn.Module) -> list[int]:
    """The decoder-layer number of each router (DeepSeek-V3's first layers are dense, so router i is
    not layer i); its ordinal when the module name carries no layer number."""
    found = {id(m): name for name, m in model.named_modules()}
    out = []
    for i, r in enumerate(routers(model)):
        match = re.search(r"layers\.(\d+)\.", found[id(r)])
        out.append(int(match.group(1)) if match else i)
    return out


def unpack_router_output(module: nn.Module, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not (isinstance(output, tuple) and len(output) == 3):
        raise TypeError(f"{type(module).__name__} returned {type(output).__name__}; rlcore's MoE support expects "
                        "routers that return (router_logits, top-k weights, top-k expert ids) (transformers >= 5)")
    return output


class RouterHooks:
    """`with` block that holds a forward hook, ``self._hook(module, inputs, output)``, on every router
    of the model (a hook returning a value replaces the router's output)."""

    def __init__(self, model: nn.Module):
        self.routers = routers(model)
        self._handles = []

    def __enter__(self):
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, module, inputs, output):
        raise NotImplementedError


class RoutingRecorder(RouterHooks):
    """Records the routers' expert ids during one decode (rollout.hf_padded.decode).

    The first forward is the prefill over the (R, L) left-padded prompts; each later one decodes one
    token for each row still running (rows leave the batch when they end). ``samples(...)`` then cuts
    out each sample's record.
    """

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.layer = {id(r): i for i, r in enumerate(self.routers)}
        self.calls: list[list[torch.Tensor]] = [[] for _ in self.routers]  # per layer, per forward: (N, k)

    def _hook(self, module, inputs, output) -> None:
        _, _, idx = unpack_router_output(module, output)
        self.calls[self.layer[id(module)]].append(idx.to("cpu", ROUTING_DTYPE))

    def samples(self, prompt_lengths: list[int], lengths: list[int], width: int,
                fed: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per row r: (prompt_lengths[r] + lengths[r] - 1, layers, k) expert ids.

        width: L, the padded prompt width of the prefill. fed: per decode forward, the (A_s,) rows it fed.
        Raises if the forwards were not one prefill plus one token per fed row and step (the record would
        not line up with the tokens).
        """
        rows = len(prompt_lengths)
        per_layer = []
        for layer, calls in enumerate(self.calls):
            prefill, decode = calls[0], calls[1:]
            k = prefill.shape[-1]
            if prefill.shape[0] != rows * width or len(decode) != len(fed) or \
                    any(c.shape[0] != len(f) for c, f in zip(decode, fed)):
                raise RuntimeError(f"routing record of layer {layer} does not match a padded prefill of "
                                   f"{rows}x{width} tokens followed by one token per running row and step")
            steps = torch.full((rows, len(decode), k), -1, dtype=ROUTING_DTYPE)  # (R, S, k)
            for s, (c, f) in enumerate(zip(decode, fed)):
                steps[f.cpu(), s] = c
            per_layer.append((prefill.view(rows, width, k), steps))
        out = []
        for r, (p, n) in enumerate(zip(prompt_lengths, lengths)):
            # A row is fed its tokens 0 .. n-2 by decode forwards 0 .. n-2 (it runs until it ends).
            layers = [torch.cat([pre[r, width - p :], steps[r, : max(n - 1, 0)]]) for pre, steps in per_layer]
            out.append(torch.stack(layers, 1))  # (positions, layers, k)
        return out
