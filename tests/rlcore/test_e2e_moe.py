"""MoE end to end through the CLI: a short GSPO run per family with moe/ metrics in TensorBoard, and an
export in checkpoint names whose reloaded logits equal the trained model's."""

import json

import pytest
import torch
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from conftest import run_cli

pytestmark = pytest.mark.slow

SHORT = ["model.warmstart.steps=0", "train.prompts_per_step=4", "rollout.samples_per_prompt=4",
         "rollout.max_new_tokens=6", "data.task.num_train=100", "data.task.num_eval=8", "trainer.total_steps=2",
         "model.tiny.hidden_size=64", "model.tiny.expert_intermediate_size=32", "train.minibatches_per_step=2"]


@pytest.mark.parametrize("family, replay", [("qwen3_moe", True), ("mixtral", False), ("deepseek_v3", True)])
def test_short_moe_run_logs_expert_load_and_exports_checkpoint_names(tmp_path, family, replay):
    run = tmp_path / "run"
    run_cli("train", f"gspo_{family}_arith", *SHORT, f"algo.routing_replay={str(replay).lower()}",
            "algo.router_aux_loss_coef=0.001", f"trainer.output_dir={run}", cwd=tmp_path)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    for key in ("moe/max_load_ratio", "moe/usage_entropy", "moe/routing_mismatch", "moe/layer_1/max_load_ratio",
                "moe/layer_1/usage_entropy", "actor/router_aux_loss", "sync/mean_logprob_diff"):
        assert key in scalars, key
    mismatch = [e.value for e in acc.Scalars("moe/routing_mismatch")]
    assert all(0.0 <= m < 0.05 for m in mismatch)  # fp32 engine and actor: the same experts nearly always

    summary = json.loads((run / "summary.json").read_text())
    assert summary["export_max_logit_diff"] == 0.0  # identical logits after from_pretrained
    with safe_open(str(run / "hf" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    block, proj = ("block_sparse_moe", "w1") if family == "mixtral" else ("mlp", "gate_proj")
    assert f"model.layers.1.{block}.experts.7.{proj}.weight" in names  # per expert, as vLLM loads them
    assert not any(n.endswith("gate_up_proj") for n in names)
    model = AutoModelForCausalLM.from_pretrained(run / "hf")
    assert model.config.model_type == family
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_local_moe_checkpoint_trains_and_exports(tmp_path, saved_model):
    """A saved Mixtral folder (per-expert names on disk) through model.path: load, train, export."""
    path = saved_model("mixtral")
    run = tmp_path / "run"
    # A random model never answers right; a format reward on "has a digit" gives groups a signal.
    recipe = tmp_path / "moe_local.yaml"
    recipe.write_text("defaults:\n  - quickstart\n  - _self_\nreward:\n  terms:\n"
                      "    - {name: format, weight: 1.0, args: {pattern: '(?s).*[0-9].*'}}\n")
    run_cli("train", str(recipe), f"model.path={path}", *SHORT, f"trainer.output_dir={run}", cwd=tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["export_max_logit_diff"] == 0.0
    trained = AutoModelForCausalLM.from_pretrained(run / "hf")
    base = AutoModelForCausalLM.from_pretrained(path)
    moved = [n for (n, a), (_, b) in zip(trained.named_parameters(), base.named_parameters()) if not torch.equal(a, b)]
    assert any("experts" in n for n in moved) and any("gate" in n for n in moved)  # experts and router trained
