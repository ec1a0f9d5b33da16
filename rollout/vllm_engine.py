"""The ``vllm`` rollout engine: vLLM's offline ``LLM``, colocated with training in the same process.

vLLM is imported only when a ``VLLMEngine`` is built, so this module imports on CPU-only machines.
Written against vLLM 0.26.0 (pyproject pins ``vllm>=0.26,<0.27``; every call below was checked in that
wheel's source, paths relative to the ``vllm/`` package; see spec/vllm.md for the colocation facts).
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import replace

import torch

from .base import Sample, SamplingParams, check_prompts, checksum, register, stop_ids
from .hf import MODES
from .routing import ROUTING_DTYPE, router_layers
from .weight_names import checkpoint_state

NEEDS = ("rollout.engine=vllm needs vLLM 0.26 and an NVIDIA GPU (CUDA): pip install rlcore[vllm] on a GPU "
         "machine, or use rollout.engine=hf, which runs everywhere")
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_TAGS = ("weights", "kv_cache")  # LLM.wake_up tags (entrypoints/llm.py); "scheduling" is level 0 only


@register("vllm")
class VLLMEngine:
    """Rollout engine on ``vllm.LLM``; same protocol and Sample contract as ``HFEngine``.

    model: the engine's own copy of the policy (what the trainer passes). Only its config, dtype,
        tensor names/shapes and MoE layout are read; its parameters are then moved to ``meta`` to free
        their memory before vLLM measures free GPU memory. vLLM starts from random (``dummy``) weights:
        nothing is sampled before the first ``load_weights``.
    eos_token_ids / pad_token_id / mode: as HFEngine; vLLM never pads and has one batching mode, so
        pad_token_id is unused and mode is only validated.
    record_routing: MoE models: fill Sample.routing from vLLM's routed-experts capture
        (``enable_return_routed_experts``; falls back to the V1 model runner, no pipeline parallelism).
    gpu_memory_utilization: fraction of the *total* GPU memory vLLM takes for weights + KV cache
        (vLLM's default 0.92 leaves nothing for training).
    sleep_level: 1 = sleep() offloads weights to pinned CPU memory; 2 = discards them (no host copy),
        so weights are garbage after wake() until the next load_weights. The trainer syncs after every
        wake(), so 2 is safe with it and cheaper.
    tensor_parallel_size: > 1 only under torchrun: every rank then builds its own engine at the same
        time (``external_launcher``: one vLLM worker per process; each TP group is one engine).
    max_model_len: prompt + generated tokens; None = the config's max_position_embeddings.
    seed: engine sampling seed; rank // tensor_parallel_size is added, so a TP group shares one seed.
    llm_kwargs: passed to ``vllm.LLM`` as is (e.g. enforce_eager, kv_cache_memory_bytes, max_num_seqs).

    Sets VLLM_ENABLE_V1_MULTIPROCESSING=0 in the environment: the engine core must live in this process
    so that weights are copied by reference (spec/vllm.md §3a). The engine starts asleep.
    """

    def __init__(self, model: torch.nn.Module, *, eos_token_ids: list[int], pad_token_id: int, mode: str = "auto",
                 record_routing: bool = False, gpu_memory_utilization: float = 0.5, sleep_level: int = 1,
                 tensor_parallel_size: int = 1, max_model_len: int | None = None, seed: int = 0, **llm_kwargs):
        if mode not in MODES:
            raise ValueError(f"unknown rollout mode {mode!r}; valid: {MODES} (vllm ignores it)")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level={sleep_level} must be 1 (offload weights) or 2 (discard weights)")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when the LLMEngine is built
        try:
            import vllm
        except ImportError as e:
            raise ImportError(f"{NEEDS} ({e})") from e
        if not torch.cuda.is_available():
            raise RuntimeError(f"{NEEDS} (torch sees no CUDA device)")
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.pad_token_id = int(pad_token_id)
        self.dtype = next(model.parameters()).dtype
        if self.dtype not in _DTYPES:
            raise ValueError(f"VLLMEngine: model dtype {self.dtype} is not one of {list(_DTYPES)}")
        self._vocab_size = model.get_input_embeddings().num_embeddings
        self._shapes = {name: tuple(t.shape) for name, t in checkpoint_state(model)}  # names load_weights gets
        self._router_layers = router_layers(model)  # decoder layer of each router (DeepSeek-V3: not 0..n-1)
        if record_routing and not self._router_layers:
            raise ValueError("VLLMEngine(record_routing=True) needs an MoE model; this one has no routers")
        self.record_routing = record_routing
        config = copy.deepcopy(model.config)
        config.architectures = config.architectures or [type(model).__name__]  # vLLM picks its class by it
        model.to("meta")  # the engine's copy: free it before vLLM checks free memory (gpu_worker request_memory)
        torch.cuda.empty_cache()

        # A folder with config.json and a neutral generation_config.json: without the latter vLLM derives
        # one from config.json and adds its eos_token_id to every request's stop ids
        # (transformers_utils/config.py try_get_generation_config, SamplingParams.update_from_generation_config).
        from transformers import GenerationConfig

        self._dir = tempfile.TemporaryDirectory(prefix="rlcore-vllm-")
        config.save_pretrained(self._dir.name)
        GenerationConfig().save_pretrained(self._dir.name)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if dist else 1
        if tensor_parallel_size > 1 and world == 1:
            raise ValueError("VLLMEngine(tensor_parallel_size>1) needs torchrun with one process per GPU")
        rank = torch.distributed.get_rank() if world > 1 else 0
        self.tensor_parallel_size, self.sleep_level = tensor_parallel_size, sleep_level
        self.llm = vllm.LLM(
            model=self._dir.name,
            skip_tokenizer_init=True,  # token ids in and out; no tokenizer files needed
            load_format="dummy",  # random init: the trainer's weights arrive through load_weights
            dtype=_DTYPES[self.dtype],
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed + rank // tensor_parallel_size,
            enable_sleep_mode=True,  # cumem pool: sleep/wake free and re-map weights and KV cache
            enable_prefix_caching=True,  # the n samples of a prompt share its KV blocks
            logprobs_mode="processed_logprobs",  # after temperature/top-k/top-p, as Sample.logprobs says
            generation_config="vllm",  # no sampling defaults from the model folder
            enable_return_routed_experts=record_routing,
            **({"distributed_executor_backend": "external_launcher"} if world > 1 else {}),
            **llm_kwargs,
        )
        if not hasattr(self.llm.llm_engine, "model_executor"):  # set only in-process (v1/engine/llm_engine.py)
            raise RuntimeError("vLLM runs its engine core in another process; VLLMEngine needs it in-process "
                               "(VLLM_ENABLE_V1_MULTIPROCESSING=0 was not honoured)")
        self.llm.sleep(level=2)  # dummy weights are disposable: no host copy
        self._asleep = set(_TAGS)

    # --- generation ---------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[Sample]]:
        """prompts: P lists of token ids -> P lists of sampling.n Samples (see HFEngine.generate)."""
        from vllm import SamplingParams as VLLMSamplingParams, TokensPrompt

        if "weights" in self._asleep:
            raise RuntimeError("VLLMEngine.generate called while asleep: call wake() (and load_weights) first")
        if not prompts:
            return []
        check_prompts(prompts, self._vocab_size)
        self._wake("kv_cache")  # after the weight sync: the KV pool is mapped only now (spec §2)
        stops = stop_ids(self.eos_token_ids, sampling)
        # vLLM refuses greedy with n > 1 (SamplingParams._verify_greedy_sampling): decode once, copy n times.
        n = 1 if sampling.is_greedy else sampling.n
        params = VLLMSamplingParams(
            n=n, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k,  # 0 = off in both
            stop_token_ids=stops,  # kept in token_ids: no tokenizer (v1/engine/detokenizer.py)
            logprobs=0,  # only the sampled token's log-prob (v1/engine/logprobs.py: the sampler puts it first)
            detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts],
                                    params, use_tqdm=False)  # in prompt order (entrypoints/offline_utils.py)
        stop_set = set(stops)
        result = []
        for prompt, out in zip(prompts, outputs):
            group = [self._sample(prompt, c, stop_set) for c in out.outputs]
            if len(group) != n:
                raise RuntimeError(f"vLLM returned {len(group)} samples for a prompt, expected {n}")
            if n != sampling.n:
                group = [replace(group[0], token_ids=list(group[0].token_ids), logprobs=list(group[0].logprobs))
                         for _ in range(sampling.n)]
            result.append(group)
        return result

    def _sample(self, prompt: list[int], c, stop_set: set[int]) -> Sample:
        """One vllm CompletionOutput -> Sample."""
        ids = list(c.token_ids)
        logprobs = [position[t].logprob for position, t in zip(c.logprobs, ids)]  # list[dict[id, Logprob]]
        routing = None
        if self.record_routing:  # CompletionOutput.routed_experts: (fed tokens, num_hidden_layers, top_k)
            if c.routed_experts is None or len(c.routed_experts) != len(prompt) + len(ids) - 1:
                raise RuntimeError("vLLM returned no or misaligned routed experts for a sample")
            ids_np = c.routed_experts[:, self._router_layers].astype("int16")  # uint8 or uint16 in vLLM
            routing = torch.from_numpy(ids_np).to(ROUTING_DTYPE)
        finish = "stop" if ids and ids[-1] in stop_set else "length"
        return Sample(token_ids=ids, logprobs=logprobs, finish_reason=finish, routing=routing)

    # --- weight sync --------------------------------------------------------------------------------

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream (checkpoint name, full tensor) pairs into vLLM's model, cast to the engine dtype.

        Must receive the whole model in one call (what rlcore.sync.stream_weights sends): this is vLLM's
        layerwise reload (GPUModelRunner.reload_weights, is_checkpoint_format=True), which buffers each
        layer's tensors until the layer is complete, runs its post-load processing (MoE kernels re-lay out
        experts) and copies the result into the live tensors; a layer sent only in part is left
        half-initialised, one not sent keeps its old values. The iterator is consumed once, lazily.
        Wakes the weights if asleep. Raises for an unknown name (vLLM's loader) or for vLLM parameters
        left unloaded (routed-expert parameters are not name-checked: vLLM reports them under other names).
        """
        self._wake("weights")
        missing = self.llm.collective_rpc(_reload, args=(self._cast(named_tensors),))[0]
        if missing:
            raise RuntimeError(f"load_weights: {len(missing)} vLLM parameters got no tensor, e.g. {missing[:5]}")
        # KV blocks computed with the old weights must not be reused (spec §3, "Prefix cache").
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("load_weights: vLLM could not reset its prefix cache (requests still running?)")

    def _cast(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in named_tensors:
            if hasattr(tensor, "full_tensor"):  # a DTensor holds only this rank's shard
                raise ValueError(f"load_weights: tensor {name!r} is a DTensor; send tensor.full_tensor()")
            yield name, tensor.detach().to(self.dtype)

    @torch.no_grad()
    def weight_checksums(self, names: list[str]) -> dict[str, tuple[float, float]]:
        """(sum, sum of |x|) in float64 of the engine's copy of each named checkpoint tensor.

        Contract with the trainer: names missing from the result are not verified (the trainer's
        log-prob check still covers them). Covered with tensor_parallel_size 1: tensors that are one vLLM
        parameter (vocabulary padding sliced off) and slices of fused ones (q/k/v -> qkv_proj,
        gate/up -> gate_up_proj, any ``packed_modules_mapping`` entry, rows in ``output_sizes`` order:
        model_executor/layers/linear.py). Not covered: routed experts (w13/w2 may be re-laid out for the
        MoE kernel), anything whose shape does not match, and everything when tensor parallel.
        """
        if self.tensor_parallel_size > 1:
            return {}
        self._wake("weights")
        wanted = {n: self._shapes[n] for n in names if n in self._shapes and ".experts." not in n}
        return self.llm.apply_model(lambda model: _checksums(model, wanted, self._vocab_size))[0]

    # --- memory -------------------------------------------------------------------------------------

    def sleep(self) -> None:
        """llm.sleep(sleep_level): free the weights (offloaded at level 1) and the KV cache."""
        if self._asleep == set(_TAGS):
            return
        if self._asleep:  # woken weights but no generate since: vLLM only puts a fully awake engine to sleep
            self.llm.wake_up(tags=sorted(self._asleep))  # (v1/executor/abstract.py Executor.sleep)
        self.llm.sleep(level=self.sleep_level)
        self._asleep = set(_TAGS)
        torch.cuda.empty_cache()

    def wake(self) -> None:
        """Map the weights back (garbage after sleep level 2 until load_weights); the KV cache follows at the
        next generate, after the weight sync, so both never compete with the sync's temporaries."""
        self._wake("weights")

    def _wake(self, tag: str) -> None:
        if tag in self._asleep:
            torch.cuda.empty_cache()  # the trainer's cached blocks are not usable by cuMemCreate
            self.llm.wake_up(tags=[tag])  # weights first: waking restores level-2 buffers into them
            self._asleep.discard(tag)


def _reload(worker, weights: Iterator[tuple[str, torch.Tensor]]) -> list[str]:
    """Run in the worker by collective_rpc (in-process: a plain call): GPUModelRunner.reload_weights'
    checkpoint-format path (v1/worker/gpu_model_runner.py), inside set_current_vllm_config as 0.26's
    Worker.reload_weights omits it, plus the check of load_weights' returned names (spec §3). Returns the
    parameters that got nothing."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    model = worker.get_model()
    with set_current_vllm_config(worker.vllm_config), torch.no_grad():
        initialize_layerwise_reload(model)
        loaded = model.load_weights(weights)
        finalize_layerwise_reload(model, worker.vllm_config.model_config)
    if loaded is None:
        return []
    return sorted(n for n, _ in model.named_parameters()
                  if n not in loaded and ".experts." not in n and not n.endswith("_scale"))  # kv-cache scales


def _checksums(model: torch.nn.Module, wanted: dict[str, tuple[int, ...]], vocab: int
               ) -> dict[str, tuple[float, float]]:
    """In the worker: checksums of vLLM's tensors for the checkpoint names in ``wanted`` (name -> shape);
    vocabulary-sized tensors may have padding rows (VocabParallelEmbedding pads to a multiple of 64)."""
    packed = getattr(model, "packed_modules_mapping", {})  # e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    out = {}
    for name, shape in wanted.items():
        t = _lookup(model.get_parameter, name)  # also finds a tied lm_head, which named_parameters() hides
        if t is None and name.count(".") >= 2:
            parent, sub, leaf = name.rsplit(".", 2)
            for fused, parts in packed.items():
                module = _lookup(model.get_submodule, f"{parent}.{fused}")
                param = _lookup(model.get_parameter, f"{parent}.{fused}.{leaf}")
                if sub in parts and param is not None and hasattr(module, "output_sizes"):
                    i, sizes = parts.index(sub), module.output_sizes
                    t = param.narrow(0, sum(sizes[:i]), sizes[i])
        if t is None or t.dim() != len(shape) or (tuple(t.shape) != shape and not (
                shape[0] == vocab and tuple(t.shape[1:]) == shape[1:] and t.shape[0] > vocab)):
            continue
        out[name] = checksum(t[:vocab] if tuple(t.shape) != shape else t)
    return out


def _lookup(get, name: str):
    try:
        return get(name)
    except AttributeError:
        return None
