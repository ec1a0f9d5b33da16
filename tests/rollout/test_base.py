"""SamplingParams validation, the ENGINES registry, prompt checks and tensor checksums."""

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


def test_checksum_in_chunks_equals_the_whole_tensor_sum(monkeypatch):
    """Chunked float64 sums equal the one-shot ones (to float64 rounding) for a tensor many chunks
    long, a non-contiguous view, a bf16 tensor, a scalar and an empty tensor."""
    monkeypatch.setattr(base, "CHECKSUM_ROWS_ELEMENTS", 100)  # 7 rows of 37 per chunk below
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 37, generator=g)
    for t in (x, x.t()[:, 3:900], x.bfloat16(), torch.tensor(-2.5), torch.empty(0, 4)):
        whole = t.double()
        total, absolute = base.checksum(t)
        assert total == pytest.approx(float(whole.sum()), rel=1e-12, abs=1e-9)
        assert absolute == pytest.approx(float(whole.abs().sum()), rel=1e-12, abs=1e-9)
    assert base.checksum(x * 1.001)[1] != pytest.approx(base.checksum(x)[1], rel=1e-6)


def test_check_prompts_names_the_bad_prompt():
    base.check_prompts([[1, 2], [3]], vocab_size=4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        base.check_prompts([[1], []], vocab_size=4)
    with pytest.raises(ValueError, match=r"prompt 0 has a token id outside \[0, 4\)"):
        base.check_prompts([[4]], vocab_size=4)
