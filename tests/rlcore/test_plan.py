"""The pre-flight memory plan (rlcore.plan): formulas against hand-computed bytes, the advice it gives,
real-size recipes without their weights, and (slow) the estimate against a measured step."""

import importlib.util

import pytest
import torch
from transformers import Qwen2Config, Qwen3MoeConfig

from conftest import REPO, run_cli
from rlcore.config import freeze
from rlcore.models import char_tokenizer, tiny_model
from rlcore.plan import GiB, estimate, layer_activation_bytes
from rlcore.recipe import compose, field_docs
from rollout.base import CHECKSUM_ROWS_ELEMENTS

# quickstart's tiny model: hidden 128, 2 layers, 4 heads (head dim 32), 2 KV heads, MLP 352, vocab 99, tied
H, LAYERS, HEADS, KV, D, I, V = 128, 2, 4, 2, 32, 352, 99
PER_LAYER = (H * H + H) + 2 * (H * KV * D + KV * D) + H * H + 3 * H * I + 2 * H  # q, k, v (biases), o, MLP, norms
PARAMS = V * H + LAYERS * PER_LAYER + H  # tied embedding once, final norm
SMALL = ["trainer.device=cpu", "train.prompts_per_step=8", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=8",
         "data.max_prompt_tokens=16", "train.max_tokens_per_microbatch=48"]

# Published shapes (config.json of the Hugging Face checkpoints), so no weights are needed.
QWEN25_7B = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
QWEN25_32B = Qwen2Config(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                         num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False)
QWEN3_30B_A3B = Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                               num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                               num_experts=128, num_experts_per_tok=8, tie_word_embeddings=False)
CONFIGS = {"models/Qwen2.5-7B": QWEN25_7B, "models/Qwen2.5-32B": QWEN25_32B, "models/Qwen3-30B-A3B": QWEN3_30B_A3B}


def plan_for(*overrides, recipe="quickstart", **kwargs):
    cfg, _ = compose(recipe, [*SMALL, *overrides] if recipe == "quickstart" else list(overrides))
    return estimate(cfg, **kwargs)


def test_parameters_counted_from_the_config_match_the_built_model():
    plan = plan_for()
    t = plan.cfg.model.tiny
    model = tiny_model(len(char_tokenizer()), hidden_size=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads,
                       num_kv_heads=t.num_kv_heads, intermediate_size=t.intermediate_size)
    assert plan.shape.params == PARAMS == sum({id(p): p.numel() for p in model.parameters()}.values())
    assert (plan.shape.hidden, plan.shape.layers, plan.shape.mlp, plan.shape.vocab) == (H, LAYERS, I, V)


def test_state_bytes_one_rank_fp32():
    plan = plan_for()
    update, rollout = plan.phases["update"], plan.phases["rollout"]
    assert update["actor params"] == PARAMS * 4
    assert update["actor AdamW (2 moments)"] == 2 * PARAMS * 4  # two fp32 moments per parameter
    assert rollout["actor grads"] == PARAMS * 4  # gradients stay allocated between steps
    assert update["engine weights"] == PARAMS * 4  # on cpu the engine's copy is always resident
    assert "reference params" not in update  # algo.kl.coef = 0: no reference copy
    assert plan_for("algo.kl.coef=0.1").phases["update"]["reference params"] == PARAMS * 4
    assert plan_for("rollout.dtype=bfloat16").phases["rollout"]["engine weights"] == PARAMS * 2


def test_zero3_on_four_ranks_divides_params_grads_and_optimizer():
    one, four = plan_for("algo.kl.coef=0.1"), plan_for("algo.kl.coef=0.1", world_size=4)
    for key in ("actor params", "actor grads", "actor AdamW (2 moments)", "reference params"):
        assert four.phases["rollout"][key] == one.phases["rollout"][key] // 4
    assert four.phases["rollout"]["engine weights"] == one.phases["rollout"]["engine weights"]  # a full copy per rank
    # zero3 gathers the root's own parameters (tied embedding, final norm) and two layers at a time
    assert four.phases["logprobs"]["gathered params"] == (V * H + H + 2 * PER_LAYER) * 4
    replicate = plan_for("trainer.sharding=replicate", world_size=4)
    assert replicate.phases["rollout"]["actor params"] == PARAMS * 4
    assert four.phases["sync"]["sync bucket"] == 64 * 2**20  # one bucket of full tensors (none with one rank)
    assert "sync bucket" not in one.phases["sync"]
    offload = plan_for("trainer.offload=true", "trainer.device=auto", world_size=4, device="cuda")
    assert "actor params" not in offload.phases["rollout"]  # in host memory
    assert "engine weights" not in offload.phases["update"]  # on cuda the engine sleeps in host memory


def test_kv_cache_prefill_and_decode_logits_by_hand():
    plan = plan_for("rollout.dtype=bfloat16")
    rows, length = 8 * 4, 16 + 8  # prompts x samples; prompt + new tokens
    rollout = plan.phases["rollout"]
    assert rollout["KV cache"] == rows * length * LAYERS * 2 * KV * D * 2
    # generate prefills all rows at once; one layer's widest point: 5 hidden-wide and 3 MLP-wide tensors
    assert rollout["prefill activations"] == rows * 16 * 2 * (5 * H + 3 * I) and "decode logits" not in rollout
    # four ranks: a quarter of the prompts per rank
    assert plan_for("rollout.dtype=bfloat16", world_size=4).phases["rollout"]["KV cache"] == rollout["KV cache"] // 4
    # short prompts and a large vocabulary: one decode step's logits, bf16 raw + DECODE_COPIES fp32 (rows x V)
    cfg, _ = compose("grpo_qwen2.5-7b_math", [])
    big = estimate(cfg, 8, model_config=QWEN25_7B, prompt_tokens=8).phases["rollout"]
    assert big["decode logits"] == 2 * 64 * 152064 * (4 * 4 + 2) and "prefill activations" not in big


def test_activations_by_hand_and_with_checkpointing():
    plan = plan_for()
    per_layer = 2 * (4 + 2 * 4) * H + 4 * HEADS * (2 * D + 2 * D) + 4 * HEADS + 4 * 4 * I  # norms, attention, SwiGLU
    assert layer_activation_bytes(plan.shape, 4) == per_layer
    micro_rows = 48 // 24  # train.max_tokens_per_microbatch // (prompt + new tokens)
    update = plan.phases["update"]
    assert update["activations"] == micro_rows * 24 * (LAYERS * per_layer + (4 + 3 * 4) * H)
    # LM head: one recomputed chunk's fp32 logits (all 16 response tokens: under a chunk) and its four temporaries
    assert update["LM head logits"] == 4 * V * (micro_rows * 8 + 4 * micro_rows * 8)
    assert "actor grads" in update  # 32 rows in 16 micro-batches: gradients accumulate under the peak
    checkpointed = plan_for("model.gradient_checkpointing=true").phases["update"]
    assert checkpointed["activations"] == micro_rows * 24 * (LAYERS * 4 * H + (4 + 3 * 4) * H)  # layer inputs
    recompute = micro_rows * 24 * per_layer  # one layer recomputed, after the head's backward
    assert checkpointed.get("recomputed layer", recompute) == recompute
    assert max(checkpointed.get("recomputed layer", 0), checkpointed.get("LM head logits", 0)) == \
        max(recompute, update["LM head logits"])
    # one micro-batch: zero_grad(set_to_none) has dropped the gradients when the head's backward peaks
    one_micro_batch = plan_for("train.max_tokens_per_microbatch=4096").phases["update"]
    assert "actor grads" not in one_micro_batch
    assert one_micro_batch["activations"] == 32 * 24 * (LAYERS * per_layer + (4 + 3 * 4) * H)


def test_render_says_what_does_not_fit_and_names_a_key():
    plan = plan_for()
    text = plan.render(device_bytes=2**20)
    assert "does not fit in" in text and "turn first:" in text
    key = text.split("turn first:")[1].split("=")[0].strip()
    assert key in {k for k, _, _ in field_docs()}
    assert "fits in" in plan.render(device_bytes=64 * GiB) and "does not fit" not in plan.render(64 * GiB)
    assert "peak:" in plan.render()


def test_advice_names_the_knob_of_the_largest_component_and_leaves_a_frozen_config_alone():
    cfg, _ = compose("grpo_qwen2.5-7b_math", ["model.gradient_checkpointing=false"])
    plan = estimate(freeze(cfg), 8, model_config=QWEN25_7B)
    update = plan.phases["update"]
    assert plan.peak_phase == "update" and max(update, key=update.get) == "activations"
    text = plan.render(60 * GiB)
    assert "does not fit in 60.00 GiB" in text and "turn first: model.gradient_checkpointing=true" in text
    assert all(new < plan.peak_bytes for *_, new in plan.options(60 * GiB))
    assert cfg.model.gradient_checkpointing is False  # options re-estimate on copies
    # checkpointing on: the rollout leads (KV cache, prefill of 128 rows x 1024 tokens at once)
    cfg, _ = compose("grpo_qwen2.5-7b_math", [])
    plan = estimate(cfg, 8, model_config=QWEN25_7B)
    assert plan.peak_phase == "rollout"
    assert "turn first: train.prompts_per_step=8" in plan.render(40 * GiB)
    assert "fits in 80.00 GiB" in plan.render(80 * GiB)


@pytest.mark.parametrize("recipe", ["grpo_qwen2.5-7b_math", "ppo_qwen2.5-7b_math", "gspo_qwen3-30b-a3b_math",
                                    "dapo_qwen2.5-32b_math", "vapo_qwen2.5-32b_math"])
def test_real_size_recipes_estimate_without_their_weights(recipe):
    cfg, _ = compose(recipe, [])
    plan = estimate(cfg, 8, model_config=CONFIGS[cfg.model.path])
    assert plan.phases["rollout"]["engine weights"] == plan.shape.params * 2  # bf16 copy, unsharded
    assert plan.phases["update"]["actor params"] == plan.shape.params * 2 // 8
    assert ("critic" in plan.phases) == cfg.critic.enabled
    assert plan.peak_bytes > 10 * GiB and plan.phases["rollout"]["KV cache"] > 0
    assert "turn first:" in plan.render(GiB)


def test_real_size_magnitudes():
    cfg, _ = compose("grpo_qwen2.5-7b_math", [])
    plan = estimate(cfg, 1, model_config=QWEN25_7B)
    assert 7.6e9 < plan.shape.params < 7.65e9
    assert 14.0 < plan.phases["update"]["actor params"] / GiB < 14.3  # 7.6B x 2 bytes
    assert 28.0 < plan.phases["update"]["actor AdamW (2 moments)"] / GiB < 28.6  # bf16 moments, like the params
    moe = estimate(compose("gspo_qwen3-30b-a3b_math", [])[0], 8, model_config=QWEN3_30B_A3B)
    assert 30.4e9 < moe.shape.params < 30.6e9 and moe.shape.mlp == 8 * 768  # 8 routed experts per token
    assert (moe.shape.routed, moe.shape.experts, moe.shape.qk_norm) == (8, 128, True)
    bf16 = 2 * (4 + 2 * 2) * 2048 + 2 * 32 * (2 * 128 + 2 * 128) + 4 * 32 + 4 * 2 * 8 * 768 \
        + 2 * 2 * 8 * 2048 + 4 * 128 + (4 + 2) * (32 + 4) * 128  # dense terms, routed copies + router, q/k norms
    assert layer_activation_bytes(moe.shape, 2) == bf16
    # tensors are checksummed a chunk of rows at a time (the 151936 x 2048 embedding is many chunks)
    assert moe.phases["sync"]["sync checksums (float64)"] == 8 * CHECKSUM_ROWS_ELEMENTS
    ppo = estimate(compose("ppo_qwen2.5-7b_math", [])[0], 8, model_config=QWEN25_7B)
    # the value model: the trunk without the LM head, plus a 1-wide value head with a bias
    assert ppo.shape.critic_params == plan.shape.params - 152064 * 3584 + 3584 + 1
    assert ppo.phases["critic"]["critic params+grads+AdamW"] == 4 * ppo.shape.critic_params * 2 // 8


def test_model_path_needs_only_its_config_json(saved_model, tmp_path):
    (tmp_path / "config.json").write_text((saved_model("qwen2") / "config.json").read_text())  # no weights here
    cfg, _ = compose("quickstart", [f"model.path={tmp_path}", "trainer.device=cpu"])
    plan = estimate(cfg)
    assert plan.shape.params == 64 * V + 2 * ((64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 128) + 64


@pytest.mark.slow
def test_estimate_within_25_percent_of_measured_peaks(tmp_path):
    """~100M parameters (hidden 768, 12 layers, vocab 32000), 1 prompt x 2 samples x 8 tokens, on CPU."""
    spec = importlib.util.spec_from_file_location("plan_vs_measured", REPO / "bench" / "plan_vs_measured.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = bench.save_model(str(tmp_path / "model"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a busy 2-core machine spin-wait ~5x slower; the peaks are the same
    try:
        cfg, memory, facts = bench.measure(bench.overrides(path, prompts=1, samples=2, new_tokens=8))
    finally:
        torch.set_num_threads(threads)
    assert facts["response_min"] == 8 and abs(facts["drift_mb"]) < 1
    plan = estimate(cfg)
    assert plan.shape.params > 100e6
    rows = {r["phase"]: r for r in bench.compare(plan, memory)}
    for phase in ("sync", "rollout", "logprobs", "update"):
        assert 0.75 < rows[phase]["ratio"] < 1.25, rows[phase]


def test_plan_cli_prints_phases_and_the_verdict(tmp_path):
    proc = run_cli("plan", "quickstart", "--device-gb", "0.001", cwd=tmp_path)
    assert "update" in proc.stdout and "rollout" in proc.stdout and "does not fit" in proc.stdout
    assert "turn first:" in proc.stdout
    assert "MiB" in proc.stdout  # a tiny model's rows in MiB, not rows of 0.00 GiB
    same = run_cli("plan", "quickstart", "--device-gb=0.001", cwd=tmp_path)
    assert same.stdout == proc.stdout


@pytest.mark.parametrize("arg", [["--device-gb", "abc"], ["--device-gb"], ["--device-gb=-1"]])
def test_plan_cli_rejects_a_bad_device_size(tmp_path, arg):
    proc = run_cli("plan", "quickstart", *arg, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--device-gb needs a positive number of GiB" in proc.stderr
    assert "Traceback" not in proc.stderr
