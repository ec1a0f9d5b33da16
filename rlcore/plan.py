"""Pre-flight memory plan: bytes per rank and phase of a recipe's RL step, before any weight loads.

`estimate(cfg)` needs only the model's shape (config.json or model.tiny; parameters are counted on the meta
device, which allocates nothing) and the batch sizes; `MemoryPlan.render(device_bytes)` prints a table per
phase, whether the peak fits, and which config key to turn first. Worst case throughout: prompts
data.max_prompt_tokens long, every sample rollout.max_new_tokens long. bench/plan_vs_measured.py checks it
against the live-tensor peaks of a real step (within 2 % per phase on a 100M model).

Notation: N unique parameters; S the shard divisor (ranks under zero3 / zero2, else 1); bp, be, bc bytes per
element of model.dtype, of the engine (rollout.dtype) and of compute (bf16 with mixed precision on several
ranks, else bp); H hidden, I the MLP width a token passes through (MoE: (routed + shared experts per token)
x expert width), nh / kvh heads / KV heads, dk / dv key / value head dims, V vocabulary, l layers.

Activations saved for backward per token and decoder layer (transformers layer on sdpa, whose kernels keep
q, k, v, output and a log-sum-exp, never a seq x seq matrix):
    2 (4 + 2 bc) H               two RMSNorms: fp32 upcast of the input, normalised value, weighted output
  + bc nh (2 dk + 2 dv) + 4 nh   q after rotary; k, v repeated to nh heads (padding rules out the GQA
                                 kernel); the output (already in o_proj's layout); fp32 log-sum-exp
  + 4 bc I                       SwiGLU: gate, up, silu(gate), their product
  + 2 bc k H + 4 E               MoE: each of the k routed copies of the input and of its expert's output
                                 (kept to scale by the routing weight); the router's fp32 softmax over E
  + (4 + bc) (nh + kvh) dk       Qwen3 q/k RMSNorms: input and normalised value
The DynamicCache the forward fills (bc kvh (dk + dv) per layer) is freed when the trunk returns, before
the peak. With gradient checkpointing a layer keeps only its input (bc H); one layer recomputed in backward
comes after the head's backward (the larger of the two counts).
The peak is at the LM head's backward: one HEAD_CHUNK_TOKENS chunk's fp32 logits recomputed (kept by
logsumexp; softmax and its product too when the entropy has a gradient; rlcore.logprobs keeps no logits
from the forward) plus that chunk's backward temporaries, before any parameter gradient of the
micro-batch exists (they count only while accumulating).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from rlcore.logprobs import HEAD_CHUNK_TOKENS
from rollout.base import CHECKSUM_ROWS_ELEMENTS

GiB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# (rows x V) fp32 tensors alive at once, read off the allocator timeline (bench/plan_vs_measured.py):
HEAD_CHUNK_COPIES = 4  # head backward, per chunk: the gather's grad, z - lse, its exp, times the incoming grad
HEAD_NOGRAD_COPIES = 2  # head without grad: logits and logits / temperature, then z and logsumexp's exp
DECODE_COPIES = 4  # a decode step: fp32 logits, the logprob recorder's previous scores, softmax, logsumexp temp


@dataclass(frozen=True)
class Shape:
    """A model's counts: unique parameters (a tied embedding once), the largest decoder layer's, the
    largest tensor (AdamW's temporaries; a sync bucket holds at least it) and the largest 2-D one (the sync
    checksums fused 3-D experts per expert); the dims of the notation (mlp = I, routed = k, experts = E)."""

    params: int; layer_params: int; largest: int; largest_2d: int  # noqa: E702
    layers: int; hidden: int; mlp: int; heads: int; kv_heads: int; dk: int; dv: int; vocab: int  # noqa: E702
    routed: int = 0; experts: int = 0; qk_norm: bool = False; critic_params: int = 0  # noqa: E702


def model_shape(cfg, model_config=None) -> Shape:
    """cfg's model shape: from model_config (a transformers config) if given, else model.path's config.json
    (local only), else model.tiny built as rlcore.models.tiny_model builds it; all on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

    from rlcore.critic import _value_config
    from rlcore.models import char_tokenizer, tiny_model
    from rlcore.sharding import decoder_layers

    m, remote = cfg.model, cfg.model.trust_remote_code
    with torch.device("meta"):
        if model_config is None and m.path is None:
            t = m.tiny
            model = tiny_model(len(char_tokenizer()), family=t.family, hidden_size=t.hidden_size,
                               num_layers=t.num_layers, num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
                               intermediate_size=t.intermediate_size, num_experts=t.num_experts,
                               experts_per_token=t.experts_per_token, expert_intermediate_size=t.expert_intermediate_size)
        else:
            if model_config is None and not Path(m.path, "config.json").is_file():
                raise FileNotFoundError(f"model.path={m.path!r}: no config.json there; the plan reads only that file")
            model_config = model_config or AutoConfig.from_pretrained(m.path, local_files_only=True,
                                                                      trust_remote_code=remote)
            model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=remote)
        critic = AutoModelForTokenClassification.from_config(_value_config(  # the value model, if any
            AutoConfig.from_pretrained(cfg.critic.path, local_files_only=True) if cfg.critic.path else model.config)
        ) if cfg.critic.enabled else None
    params = list({id(p): p for p in model.parameters()}.values())
    c = model.config.get_text_config()
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    mlp, routed = c.intermediate_size, getattr(c, "num_experts_per_tok", None) or 0
    if routed:
        width = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
        mlp = (routed + (getattr(c, "n_shared_experts", None) or 0)) * width
    layers = decoder_layers(model)
    return Shape(
        params=sum(p.numel() for p in params),
        layer_params=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        largest=max(p.numel() for p in params), largest_2d=max(p.numel() for p in params if p.dim() <= 2),
        layers=c.num_hidden_layers, hidden=c.hidden_size, mlp=mlp, heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        dk=(c.qk_nope_head_dim + c.qk_rope_head_dim) if hasattr(c, "qk_nope_head_dim") else head_dim,
        dv=getattr(c, "v_head_dim", None) or head_dim, vocab=c.vocab_size, routed=routed,
        experts=routed and (getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None)
                            or getattr(c, "n_routed_experts", None) or 0),
        qk_norm=any(name.endswith("q_norm") for name, _ in layers[0].named_modules()),
        critic_params=sum(p.numel() for p in critic.parameters()) if critic is not None else 0)


def layer_activation_bytes(s: Shape, bc: int) -> int:
    """Bytes saved for backward per token per decoder layer (the formula in the module docstring)."""
    return (2 * (4 + 2 * bc) * s.hidden + bc * s.heads * (2 * s.dk + 2 * s.dv) + 4 * s.heads + 4 * bc * s.mlp
            + 2 * bc * s.routed * s.hidden + 4 * s.experts + (4 + bc) * (s.heads + s.kv_heads) * s.dk * s.qk_norm)


def estimate(cfg, world_size: int | None = None, *, model_config=None, prompt_tokens: int | None = None,
             device: str | None = None) -> "MemoryPlan":
    """Bytes per rank and phase. world_size: default trainer.nproc; prompt_tokens: default
    data.max_prompt_tokens; device: default cpu for trainer.device=cpu, else cuda (where the engine sleeps
    in host memory outside sync and rollout)."""
    device = device or ("cpu" if cfg.trainer.device == "cpu" else "cuda")
    return _plan(cfg, model_shape(cfg, model_config), world_size or cfg.trainer.nproc, device,
                 prompt_tokens or cfg.data.max_prompt_tokens)


def _plan(c, s: Shape, W: int, device: str, P: int) -> "MemoryPlan":
    m, r, t, tr = c.model, c.rollout, c.train, c.trainer
    S = W if W > 1 and tr.sharding in ("zero3", "zero2") else 1
    bp, be = BYTES[m.dtype], BYTES[r.dtype or m.dtype]
    bc = 2 if W > 1 and tr.mixed_precision else bp
    N, T, l, V = s.params, r.max_new_tokens, s.layers, s.vocab
    L = P + T
    on = 0 if tr.offload and W > 1 and device == "cuda" else 1  # FSDP CPU offload: the state lives in host memory
    state = {"actor params": on * N * bp // S, "actor grads": on * N * bp // S,  # grads live on between steps
             "actor AdamW (2 moments)": on * 2 * N * bp // S,  # torch's AdamW moments take the parameter dtype
             "reference params": on * N * bp // S * (c.algo.kl.coef > 0),
             "critic params+grads+AdamW": on * 4 * s.critic_params * bp // S}
    grads = {"actor grads": state["actor grads"]}
    engine = {"engine weights": N * be}  # the hf engine's own full copy, on every rank
    resident = engine if device == "cpu" else {}
    # zero3 gathers the root's own parameters (embeddings, final norm, head) and two layers (one prefetched);
    # zero2 keeps every layer gathered through backward, and mixed precision keeps bf16 copies likewise.
    gathered = {} if W == 1 or (tr.sharding == "replicate" and bc == bp) else {"gathered params": bc * (
        N - (l - 2) * s.layer_params if tr.sharding == "zero3" else N)}
    rows = t.prompts_per_step // W * r.samples_per_prompt  # samples per rank
    per_minibatch = rows // t.minibatches_per_step
    mb_rows = max(1, min(per_minibatch, t.max_tokens_per_microbatch // L))  # rows x longest <= the token budget
    lp_rows = max(1, min(rows, t.max_tokens_per_microbatch // L))

    kv = rows * L * l * s.kv_heads * (s.dk + s.dv) * be  # K and V per row, position and layer
    decode = rows * V * (4 * DECODE_COPIES + be)  # one step's (rows x V) logits, raw and fp32
    prefill = rows * P * be * (5 * s.hidden + 3 * s.mlp)  # generate prefills every row at once, layer by layer
    bucket = max(r.sync_bucket_mb * 2**20, s.largest * bp) if W > 1 else 0  # one bucket of full tensors
    # rlcore.sync checksums each sent tensor a chunk of rows at a time: the chunk as float64
    checksum = 8 * min(s.largest_2d, CHECKSUM_ROWS_ELEMENTS)
    kept = 1 + 2 * (c.algo.entropy_coef != 0)  # (chunk x V) fp32 tensors a recomputed head chunk keeps

    def fwd_bwd(n: int) -> dict:  # one micro-batch of n rows at its peak: the head's backward
        head = {"LM head logits": 4 * V * (kept + HEAD_CHUNK_COPIES) * min(HEAD_CHUNK_TOKENS, n * T)}
        final = (4 + 3 * bc) * s.hidden  # final norm, last hidden
        if not m.gradient_checkpointing:
            return {"activations": n * L * (l * layer_activation_bytes(s, bc) + final), **head}
        # checkpointing: layer inputs; then the head's backward or, later, one layer recomputed
        return {"activations": n * L * (l * bc * s.hidden + final),
                **_larger(head, {"recomputed layer": n * L * layer_activation_bytes(s, bc)})}

    # zero_grad(set_to_none) opens every mini-batch: its first micro-batch peaks without gradients, the
    # second (full, or the remainder) with them; after backward, AdamW's step (on cuda the foreach kernels
    # allocate sqrt(v) of every parameter at once; on cpu two temporaries of one parameter).
    later = mb_rows if per_minibatch >= 2 * mb_rows else per_minibatch - mb_rows
    train = _larger(fwd_bwd(mb_rows), {**grads, **fwd_bwd(later)} if later > 0 else {})
    step = {**grads, "AdamW step temporaries": on * (N * bp // S if device == "cuda" else 2 * s.largest * bp)}
    # a no-grad forward: every layer's KV cache (use_cache is on) and one layer at its widest (residual in
    # and out, normed input, 3 MLP-wide tensors), the final hidden; then the head, never both at once
    forward = {"activations": lp_rows * L * bc * (l * s.kv_heads * (s.dk + s.dv) + 5 * s.hidden + 3 * s.mlp)}
    head = {"LM head logits": 4 * V * HEAD_NOGRAD_COPIES * min(HEAD_CHUNK_TOKENS, lp_rows * T)
            + lp_rows * L * bc * s.hidden}
    no_grads = {k: v for k, v in state.items() if k not in grads}
    phases = {
        "sync": {**state, **engine, "sync bucket": bucket, "sync checksums (float64)": checksum},
        "rollout": {**state, **engine, "KV cache": kv,
                    **({"decode logits": decode} if decode >= prefill else {"prefill activations": prefill})},
        "logprobs": {**state, **resident, **gathered, **_larger(forward, head)},
        "update": {**no_grads, **resident, **gathered, **_larger(train, step)},
    }
    if c.critic.enabled:  # the value model: no gradient checkpointing, a 1-wide head
        phases["critic"] = {**state, **resident, **gathered,
                            "activations": mb_rows * L * (l * layer_activation_bytes(s, bc) + 3 * bc * s.hidden)}
    return MemoryPlan({k: {n: b for n, b in v.items() if b} for k, v in phases.items()}, c, s, W, device, P)


@dataclass
class MemoryPlan:
    phases: dict[str, dict[str, int]]  # phase -> component -> bytes per rank
    cfg: object
    shape: Shape
    world_size: int
    device: str
    prompt_tokens: int

    def total(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.total)

    @property
    def peak_bytes(self) -> int:
        return self.total(self.peak_phase)

    def render(self, device_bytes: int | None = None) -> str:
        c, s, W, peak = self.cfg, self.shape, self.world_size, self.peak_bytes
        ranks = f"{W} ranks ({c.trainer.sharding}{', offload' if c.trainer.offload else ''})" if W > 1 else "1 rank"
        lines = [f"memory per rank: {s.params / 1e6:,.1f}M parameters ({c.model.dtype}), {ranks}, {self.device}; "
                 f"prompts <= {self.prompt_tokens} + {c.rollout.max_new_tokens} new tokens"]
        for phase, parts in self.phases.items():
            lines += [f"\n{phase}{'  <- peak' if phase == self.peak_phase else ''}", f"  {'component':<30}{'size':>11}"]
            lines += [f"  {k:<30}{size(v):>11}" for k, v in [*parts.items(), ("total", self.total(phase))]]
        lines.append(f"\npeak: {self.peak_phase}, {size(peak)} per rank")
        if device_bytes is not None and peak <= device_bytes:
            lines.append(f"fits in {size(device_bytes)} ({peak / device_bytes:.0%}; leave room for the CUDA "
                         "context and allocator fragmentation)")
        elif device_bytes is not None:
            lines.append(f"does not fit in {size(device_bytes)} (short by {size(peak - device_bytes)})")
            options = self.options(device_bytes)
            for i, (key, value, why, new) in enumerate(options):
                shown = str(value).lower() if isinstance(value, bool) else value
                lines.append(f"  {'or:        ' if i else 'turn first:'} {key}={shown}  ({why}; peak -> "
                             f"{size(new)}{', fits' if new <= device_bytes else ''})")
            lines += [] if options else ["  no single config key helps: use more or larger devices"]
        return "\n".join(lines)

    def options(self, device_bytes: int = 0) -> list[tuple[str, object, str, int]]:
        """(key, value, why, new peak) of one-key changes aimed at the peak phase's large components, each
        re-estimated: those that fit first (largest component first), then config before hardware
        (trainer.nproc), then by the new peak."""
        c, W, seen, out = self.cfg, self.world_size, set(), []
        parts = self.phases[self.peak_phase]
        for comp in sorted(parts, key=parts.get, reverse=True):
            if parts[comp] < 0.05 * self.peak_bytes:
                break
            for key, value in _knobs(comp, c, W, self.device):
                if (key, value) in seen or _get(c, key) == value:
                    continue
                seen.add((key, value))
                new = _plan(_with(c, key, value), self.shape, value if key == "trainer.nproc" else W, self.device,
                            self.prompt_tokens).peak_bytes
                if new < self.peak_bytes:
                    out.append((key, value, f"{comp} {size(parts[comp])}", new))
        return sorted(out, key=lambda o: (o[3] > device_bytes, o[0] == "trainer.nproc",
                                          o[3] if o[3] > device_bytes else 0))[:4]


def size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (GiB at most): 3.31 GiB, 1.52 MiB."""
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _knobs(comp: str, c, W: int, device: str) -> list[tuple[str, object]]:
    """One-key config changes that shrink a component, the most direct first."""
    t, r = c.train, c.rollout
    half_budget = max(c.data.max_prompt_tokens + r.max_new_tokens, t.max_tokens_per_microbatch // 2)
    more_ranks = [("trainer.nproc", 2 * W)] if t.prompts_per_step % (2 * W) == 0 else []
    state = [("trainer.sharding", "zero3"), *[("trainer.offload", True)] * (device == "cuda")] if W > 1 else []
    batch = [("train.prompts_per_step", t.prompts_per_step // 2)] * (t.prompts_per_step % (2 * W) == 0)
    batch += [("rollout.samples_per_prompt", r.samples_per_prompt // 2)] * (r.samples_per_prompt >= 4)
    batch += [("rollout.max_new_tokens", r.max_new_tokens // 2), *more_ranks]
    return {"activations": [("model.gradient_checkpointing", True), ("train.max_tokens_per_microbatch", half_budget)],
            "LM head logits": [("train.max_tokens_per_microbatch", half_budget)],
            "recomputed layer": [("train.max_tokens_per_microbatch", half_budget)],
            "engine weights": [("rollout.dtype", "bfloat16")],
            "KV cache": batch, "decode logits": batch, "prefill activations": batch,
            "sync bucket": [("rollout.sync_bucket_mb", max(1, r.sync_bucket_mb // 4))],
            "sync checksums (float64)": []}.get(comp, [*state, *more_ranks])


def _larger(a: dict, b: dict) -> dict:
    """Of two stages that never coexist, the one holding more bytes."""
    return a if sum(a.values()) >= sum(b.values()) else b


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _with(cfg, key: str, value):
    """A copy of cfg with one dotted key changed (a frozen config too)."""
    cfg = copy.deepcopy(cfg)
    path, leaf = key.rsplit(".", 1)
    object.__setattr__(_get(cfg, path), leaf, value)
    return cfg

