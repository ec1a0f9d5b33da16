"""rollout.engine=auto: the engine bench/vllm_vs_hf.py measured faster, from what the run has."""

import importlib.util

import pytest
import torch

from rlcore.build import VLLM_MIN_PARAMS_ON_CPU, choose_engine
from rlcore.recipe import compose
from rlcore.models import tiny_model


@pytest.fixture
def vllm_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))


def with_params(model, num: int):
    """model, with an extra parameter that brings its count to num."""
    have = sum(p.numel() for p in model.parameters())
    model.register_parameter("padding", torch.nn.Parameter(torch.empty(max(0, num - have), device="meta")))
    return model


def test_named_engines_pass_through():
    cfg, _ = compose("quickstart", ["rollout.engine=hf"])
    assert choose_engine(cfg, tiny_model(100), "cuda") == ("hf", "rollout.engine")


def test_auto_without_vllm_is_hf():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    cfg, _ = compose("quickstart", [])
    assert cfg.rollout.engine == "auto"
    assert choose_engine(cfg, tiny_model(100), "cuda")[0] == "hf"


def test_auto_with_vllm_follows_the_measurement(vllm_installed):
    cfg, _ = compose("quickstart", [])
    small = tiny_model(100)  # head size 32: vLLM's CPU kernels have it
    assert choose_engine(cfg, small, "cuda")[0] == "vllm"
    name, why = choose_engine(cfg, small, "cpu")
    assert name == "hf" and "faster with hf on CPU" in why
    assert choose_engine(cfg, with_params(tiny_model(100), VLLM_MIN_PARAMS_ON_CPU), "cpu")[0] == "vllm"
    odd_heads = with_params(tiny_model(100, hidden_size=96, num_heads=4, num_kv_heads=2), VLLM_MIN_PARAMS_ON_CPU)
    assert choose_engine(cfg, odd_heads, "cpu")[0] == "hf"  # head size 24: no CPU kernel
    replay, _ = compose("gspo_qwen3_moe_arith", ["algo.routing_replay=true"])
    big_moe = with_params(tiny_model(100, family="qwen3_moe"), VLLM_MIN_PARAMS_ON_CPU)
    assert choose_engine(replay, big_moe, "cpu")[0] == "hf"  # vLLM's CPU build cannot record routing
