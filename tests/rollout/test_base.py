"""SamplingParams validation and the ENGINES registry."""

import pytest

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
