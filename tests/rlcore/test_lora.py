"""LoRA: merged weights are W + (alpha / r) B A, the reference is the base with adapters off, the sync
and the export carry the merged weights, the adapter export reloads over the base, checkpoints keep it."""

import copy

import pytest
import torch
from conftest import run_cli
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rlcore.checkpoint import load_checkpoint, load_checkpoint_model, save_checkpoint
from rlcore.export import export_hf
from rlcore.actor import build_optimizer
from rlcore.config import LoraConfig, RLConfig
from rlcore.logprobs import response_logprobs
from rlcore.lora import apply_lora, merged_state
from rlcore.models import char_tokenizer, tiny_model


def adapted(rank=4, alpha=8.0, seed=0):
    tok = char_tokenizer()
    base = tiny_model(len(tok), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                      seed=seed)
    original = copy.deepcopy(base)
    cfg = LoraConfig(rank=rank, alpha=alpha)
    model = apply_lora(base, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero; give it values so the adapters change the model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model, original, tok


def test_merged_weights_are_base_plus_scaled_BA():
    model, original, _ = adapted(rank=4, alpha=8.0)
    merged = dict(merged_state(model))
    q = model.base_model.model.model.layers[1].self_attn.q_proj
    A, B = q.lora_A["default"].weight, q.lora_B["default"].weight
    expected = original.model.layers[1].self_attn.q_proj.weight + (8.0 / 4) * B @ A
    torch.testing.assert_close(merged["model.layers.1.self_attn.q_proj.weight"], expected, rtol=0, atol=1e-7)
    assert set(merged) == set(original.state_dict())  # the base model's own names, nothing else
    torch.testing.assert_close(merged["model.embed_tokens.weight"], original.model.embed_tokens.weight)


def test_reference_is_the_base_with_adapters_disabled():
    model, original, _ = adapted()
    prompts, ids, mask = [[3, 4, 5]], torch.tensor([[6, 7, 8]]), torch.ones(1, 3)
    with torch.no_grad():
        base_logp, _ = response_logprobs(original, prompts, ids, mask, temperature=1.0, pad_id=0)
        with model.disable_adapter():
            ref_logp, _ = response_logprobs(model, prompts, ids, mask, temperature=1.0, pad_id=0)
        adapted_logp, _ = response_logprobs(model, prompts, ids, mask, temperature=1.0, pad_id=0)
    torch.testing.assert_close(ref_logp, base_logp, rtol=0, atol=1e-6)
    assert (adapted_logp - base_logp).abs().max() > 1e-3  # the adapters do change the policy


def test_merged_export_equals_base_plus_adapters(tmp_path):
    model, original, tok = adapted()
    diff = export_hf(model, tok, tmp_path / "hf")
    assert diff <= 1e-5  # reloaded merged logits vs the adapted model's
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for name, tensor in merged_state(model):
        torch.testing.assert_close(exported.state_dict()[name], tensor, rtol=0, atol=0)
    assert not (tmp_path / "hf" / "adapter_config.json").exists()


def test_adapter_export_reloads_over_the_base(tmp_path):
    model, original, tok = adapted()
    diff = export_hf(model, tok, tmp_path / "adapter", lora_export="adapter")
    assert diff <= 1e-5 and (tmp_path / "adapter" / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(original, tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_checkpoint_round_trip_and_export_from_checkpoint(tmp_path):
    model, original, tok = adapted()
    opt, sched = build_optimizer(model, RLConfig())
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    folder = save_checkpoint(tmp_path, 1, model=model, tokenizer=tok, optimizer=opt, scheduler=sched,
                             data_state={}, config_yaml="x: 1\n", keep_last=1)
    fresh, _, _ = adapted(seed=3)
    opt2, sched2 = build_optimizer(fresh, RLConfig())
    load_checkpoint(folder, model=fresh, optimizer=opt2, scheduler=sched2)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    restored = load_checkpoint_model(folder)
    assert isinstance(restored, PeftModel)
    for (name, a), (_, b) in zip(merged_state(model), merged_state(restored)):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_lora_recipe_runs_through_the_cli_and_exports_merged(tmp_path):
    run = tmp_path / "run"
    run_cli("train", "grpo_lora_arith", "model.warmstart.steps=0", "train.prompts_per_step=4",
            "rollout.samples_per_prompt=4", "rollout.max_new_tokens=6", "data.task.num_train=64",
            "data.task.num_eval=8", "trainer.total_steps=2", f"trainer.output_dir={run}", cwd=tmp_path)
    exported = AutoModelForCausalLM.from_pretrained(run / "hf")
    assert not any("lora" in n for n in exported.state_dict())
