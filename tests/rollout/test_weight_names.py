"""Checkpoint-format names: the sync sends exactly what save_pretrained writes, and the hf engine loads
per-expert tensors into its fused experts in place."""

import pytest
import torch
from safetensors import safe_open

from rlcore.models import FAMILIES, tiny_model
from rollout.hf import HFEngine
from rollout.weight_names import checkpoint_state

SHAPE = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48, num_experts=4,
             expert_intermediate_size=16)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_names_and_values_equal_save_pretrained(tmp_path, family):
    model = tiny_model(40, family=family, seed=0, **SHAPE)
    model.save_pretrained(tmp_path)
    ours = dict(checkpoint_state(model))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    tied = {"lm_head.weight"}  # tied to the embedding: save_pretrained writes it once
    assert set(ours) - tied == set(saved) - tied
    for name, tensor in saved.items():
        assert torch.equal(ours[name], tensor), name
    if family != "qwen2" and family != "llama":  # MoE: experts are per-expert tensors, as vLLM loads them
        layer = "block_sparse_moe" if family == "mixtral" else "mlp"
        proj = "w1" if family == "mixtral" else "gate_proj"
        assert f"model.layers.1.{layer}.experts.3.{proj}.weight" in ours


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_hf_engine_loads_checkpoint_names_into_fused_experts(family):
    source = tiny_model(40, family=family, seed=1, **SHAPE)
    engine_model = tiny_model(40, family=family, seed=2, **SHAPE)
    engine = HFEngine(engine_model, eos_token_ids=[1], pad_token_id=0)
    storages = {t.untyped_storage().data_ptr() for t in engine.model.state_dict().values()}
    engine.load_weights(checkpoint_state(source))
    for name, tensor in source.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], tensor), name
    # in place: the engine's parameters are the same storages as before
    assert {t.untyped_storage().data_ptr() for t in engine.model.state_dict().values()} == storages


def test_checkpoint_views_share_storage_with_the_fused_parameter():
    model = tiny_model(40, family="qwen3_moe", seed=0, **SHAPE)
    fused = model.model.layers[0].mlp.experts.gate_up_proj
    views = dict(checkpoint_state(model))
    gate, up = views["model.layers.0.mlp.experts.2.gate_proj.weight"], views["model.layers.0.mlp.experts.2.up_proj.weight"]
    assert gate.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert torch.equal(torch.cat([gate, up]), fused[2].detach())


def test_unknown_checkpoint_name_is_refused_by_name():
    engine = HFEngine(tiny_model(40, family="mixtral", seed=0, **SHAPE), eos_token_ids=[1], pad_token_id=0)
    with pytest.raises(ValueError, match="experts.9.w1"):
        engine.load_weights([("model.layers.0.block_sparse_moe.experts.9.w1.weight", torch.zeros(16, 32))])
