"""The ``hf`` rollout engine: generation with transformers on the engine's own copy of the policy.

It holds its own inference copy of the weights and receives new ones through ``load_weights``, so the
weight-sync path that the vLLM engine uses is exercised on every machine, CPU included.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from functools import partial

import torch
from transformers import GenerationConfig

from .base import Sample, SamplingParams, check_budgets, check_prompts, checksum, cut_to_budget, register, stop_ids
from .hf_paged import generate_paged
from .hf_padded import generate_padded
from .routing import routers
from .weight_names import checkpoint_tensors

MODES = ("auto", "generate", "paged")


def resolve_mode(mode: str, device: torch.device) -> str:
    """"auto" -> the mode measured faster on this device type; other modes pass through.

    bench/engine_modes.py on the 2-core CPU dev box (torch default 2 threads, machine otherwise idle):
    Qwen2-shaped random models, 16 prompts x 12 tokens x n=8, <= 32 new tokens, T=1, tokens/s:

        model              eos (some stop early)        no eos (all 32 tokens)
        hidden 256, 4 L    generate 8551 / paged 2528   generate 9671 / paged 2484   (3.4x, 3.9x)
        hidden 128, 2 L    generate 26731 / paged 4352  generate 30141 / paged 4603  (6.1x, 6.5x)

    So "generate" on CPU. Why paged loses there: without flash attention, continuous batching packs all
    running samples into one sequence and runs sdpa with a block-diagonal mask, so attention costs
    (queries of all samples) x (cached tokens of all samples): about half of its time in this workload.
    CUDA was not measured (no GPU was available to this change): "generate" too until
    bench/engine_modes.py is run on a GPU (paged with flash attention may win there).

    Caution: on a CPU shared with other busy processes, 2 intra-op threads per op make "generate"
    ~30x slower (OpenMP threads spin-waiting for a descheduled peer), and paged then looks 6-9x
    faster; with torch.set_num_threads(1) generate is again 3.2-6.2x faster. Set threads per rank.
    """
    if mode not in MODES:
        raise ValueError(f"unknown HFEngine mode {mode!r}; valid: {MODES}")
    if mode != "auto":
        return mode
    return "generate"  # measured on CPU; the CUDA choice is a placeholder until measured


@register("hf")
class HFEngine:
    """Rollout engine on a transformers causal LM.

    model: the engine's OWN inference copy (e.g. ``copy.deepcopy(actor)``): it is put in eval mode with
        requires_grad False, its ``generation_config`` is replaced by a neutral one (a checkpoint's
        generation_config.json, e.g. top_k=20 or repetition_penalty=1.05, must not leak into sampling),
        and in "paged" mode transformers may switch its attention implementation for the call.
    eos_token_ids: ids that end a sample (with each call's ``SamplingParams.stop_token_ids``).
    pad_token_id: id for left padding in "generate" mode; padding never appears in a Sample.
    mode: "generate" (left-padded prefill, then a decode that drops each row, and its KV cache, when it
        ends: rollout.hf_padded), "paged" (continuous batching ``model.generate_batch``)
        or "auto" (see ``resolve_mode``). Both give the same distribution and logprob definition.
    record_routing: MoE models in "generate" mode: each Sample carries the experts its tokens were
        routed to (Sample.routing), for routing replay in training.

    RNG: sampling draws from torch's global RNG (seed it with torch.manual_seed). "generate" consumes it
    directly (on CPU exactly as transformers' ``model.generate`` would); "paged" draws one seed from it
    and leaves the rest of the caller's stream untouched.
    """

    def __init__(self, model: torch.nn.Module, *, eos_token_ids: list[int], pad_token_id: int, mode: str = "auto",
                 record_routing: bool = False):
        self.model = model.eval().requires_grad_(False)
        self.model.generation_config = GenerationConfig()
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.pad_token_id = int(pad_token_id)
        self.device = next(model.parameters()).device
        self.mode = resolve_mode(mode, self.device)
        if record_routing and not routers(self.model):
            raise ValueError("HFEngine(record_routing=True) needs an MoE model; this one has no routers")
        if record_routing and self.mode != "generate":
            raise ValueError(f"recording MoE routing needs the 'generate' mode, not {self.mode!r}")
        self.record_routing = record_routing
        self.is_sleeping = False
        self._vocab_size = model.get_input_embeddings().num_embeddings

    # --- generation ---------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 max_new_tokens: list[int] | None = None) -> list[list[Sample]]:
        """prompts: P lists of token ids (any lengths >= 1) -> P lists of sampling.n Samples.

        A sample ends at the first eos/stop token (kept, finish_reason "stop") or after
        max_new_tokens tokens ("length"). Sample.logprobs are processed-mode logprobs: see Sample.
        max_new_tokens: per-prompt budgets (rollout.base.check_budgets); all rows decode to the
        largest and each prompt's samples are then cut to its own (rollout.base.cut_to_budget).
        """
        if self.is_sleeping:
            raise RuntimeError("HFEngine.generate called while asleep: call wake() first")
        if not prompts:
            return []
        check_prompts(prompts, self._vocab_size)
        check_budgets(max_new_tokens, len(prompts), sampling)
        out = self._generate(prompts, sampling)
        if max_new_tokens is None:
            return out
        return [[cut_to_budget(s, budget, len(p)) for s in group]
                for group, budget, p in zip(out, max_new_tokens, prompts)]

    def _generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[Sample]]:
        stops = stop_ids(self.eos_token_ids, sampling)
        run = generate_paged
        if self.mode == "generate":
            run = partial(generate_padded, record_routing=self.record_routing)
        if sampling.is_greedy and sampling.n > 1:
            # The n greedy samples are identical: decode once (transformers also refuses greedy with
            # num_return_sequences > 1) and hand out n independent copies.
            once = run(self.model, prompts, replace(sampling, n=1), stop_ids=stops, pad_token_id=self.pad_token_id)
            return [[replace(s, token_ids=list(s.token_ids), logprobs=list(s.logprobs)) for s in g * sampling.n]
                    for g in once]
        return run(self.model, prompts, sampling, stop_ids=stops, pad_token_id=self.pad_token_id)

    # --- weight sync --------------------------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (name, full tensor) pairs into the engine's parameters, in place, one at a time.

        Names are checkpoint names (what ``save_pretrained`` writes and vLLM loads, see
        ``rollout.weight_names``: per-expert tensors of MoE layers) or ``model.state_dict()`` names of
        the same transformers class (e.g. ``model.layers.0.self_attn.q_proj.weight``, a fused
        ``mlp.experts.gate_up_proj``); per-expert tensors are copied into the fused parameter's
        slices in place. Any subset may be sent, in any
        number of buckets: ``named_tensors`` is consumed once and nothing is held after each copy.
        With tied embeddings ``lm_head.weight`` and ``model.embed_tokens.weight`` are one tensor,
        so sending either (or both) updates both. dtype and device are converted by the copy.

        Raises ValueError naming the tensor for an unknown name, a shape mismatch or a sharded
        DTensor. Tensors copied before the error stay copied: treat the error as fatal.
        """
        targets = self._targets()
        for name, tensor in named_tensors:
            target = targets.get(name)
            if target is None:
                examples = ", ".join(list(targets)[:3])
                raise ValueError(
                    f"load_weights: unknown tensor {name!r}; the engine's model has names like {examples} "
                    "(strip wrapper prefixes such as 'module.' or '_orig_mod.')"
                )
            if hasattr(tensor, "full_tensor"):  # torch.distributed DTensor: only this rank's shard
                raise ValueError(f"load_weights: tensor {name!r} is a DTensor; send tensor.full_tensor()")
            if tensor.shape != target.shape:
                raise ValueError(
                    f"load_weights: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"the engine expects {tuple(target.shape)}"
                )
            target.copy_(tensor)

    def _targets(self) -> dict[str, torch.Tensor]:
        """name -> live Parameter/buffer (no copies), plus per-expert views into fused expert parameters."""
        targets = self.model.state_dict(keep_vars=True)
        model_type = self.model.config.model_type
        return targets | {ckpt: view for name, t in list(targets.items())
                          for ckpt, view in checkpoint_tensors(name, t.data, model_type) if ckpt != name}

    @torch.no_grad()
    def weight_checksums(self, names: list[str]) -> dict[str, tuple[float, float]]:
        """(sum, sum of |x|) in float64 of the engine's tensors under these names (the sync check)."""
        targets = self._targets()
        return {name: checksum(targets[name]) for name in names}

    # --- memory -------------------------------------------------------------------------------------

    def sleep(self) -> None:
        """On CUDA: move the weights to CPU and empty the CUDA cache (the KV cache only lives during
        generate, so it is already gone). On CPU: nothing to free, a no-op apart from the state flag,
        which still makes generate() refuse to run while asleep so call-order bugs show up on CPU."""
        if self.is_sleeping:
            return
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self.is_sleeping = True

    def wake(self) -> None:
        """Undo sleep(): weights back to the engine's device (no-op on CPU)."""
        if not self.is_sleeping:
            return
        if self.device.type == "cuda":
            self.model.to(self.device)
        self.is_sleeping = False
