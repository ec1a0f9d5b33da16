"""HFEngine.load_weights (streamed, checkpoint names, tied embeddings, errors) and sleep/wake on CPU."""

import copy

import pytest
import torch

from rollout import HFEngine, SamplingParams

PROMPTS = [[5, 9, 14, 3, 22, 7], [40, 2, 11]]
GREEDY = SamplingParams(n=1, max_new_tokens=10, temperature=0)


def greedy_tokens(engine):
    return [g[0].token_ids for g in engine.generate(PROMPTS, GREEDY)]


def streamed(state_dict, skip=()):
    """A one-shot generator, as the trainer's bucketed gather produces: never all tensors at once."""
    return ((name, tensor.clone()) for name, tensor in state_dict.items() if name not in skip)


@pytest.mark.parametrize("arch, tie, skip", [
    ("qwen2", True, ()),                                   # tied, both names sent
    ("qwen2", True, ("lm_head.weight",)),                  # tied, lm_head left out
    ("qwen2", True, ("model.embed_tokens.weight",)),       # tied, only lm_head sent
    ("llama", False, ()),                                  # untied: lm_head is its own tensor
])
def test_load_weights_makes_engine_generate_like_the_new_model(tiny_model, mode, arch, tie, skip):
    old, new = tiny_model(arch, seed=0, tie=tie), tiny_model(arch, seed=1, tie=tie)
    expected = greedy_tokens(HFEngine(copy.deepcopy(new), eos_token_ids=[], pad_token_id=0, mode=mode))
    engine = HFEngine(old, eos_token_ids=[], pad_token_id=0, mode=mode)
    assert greedy_tokens(engine) != expected  # the two seeds really decode differently

    engine.load_weights(streamed(new.state_dict(), skip))
    assert greedy_tokens(engine) == expected
    for name, tensor in new.state_dict().items():
        torch.testing.assert_close(engine.model.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    if tie:  # still one tensor
        assert engine.model.lm_head.weight.data_ptr() == engine.model.model.embed_tokens.weight.data_ptr()


def test_load_weights_converts_dtype_and_keeps_params_frozen(tiny_model):
    engine = HFEngine(tiny_model().to(torch.bfloat16), eos_token_ids=[], pad_token_id=0, mode="generate")
    source = tiny_model(seed=1)  # fp32, as a trainer's master weights
    engine.load_weights(streamed(source.state_dict()))
    for name, param in engine.model.named_parameters():
        assert param.dtype == torch.bfloat16 and not param.requires_grad
        torch.testing.assert_close(param, source.state_dict()[name].to(torch.bfloat16), atol=0, rtol=0)


def test_load_weights_rejects_unknown_name_and_wrong_shape(tiny_model):
    engine = HFEngine(tiny_model(), eos_token_ids=[], pad_token_id=0, mode="generate")
    with pytest.raises(ValueError, match=r"unknown tensor 'module\.model\.norm\.weight'"):
        engine.load_weights([("module.model.norm.weight", torch.ones(64))])
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(65,\), the engine expects \(64,\)"):
        engine.load_weights([("model.norm.weight", torch.ones(65))])
    torch.testing.assert_close(engine.model.model.norm.weight, tiny_model().model.norm.weight)  # untouched


def test_engine_model_is_eval_and_frozen(tiny_model):
    model = tiny_model().train()
    engine = HFEngine(model, eos_token_ids=[], pad_token_id=0)
    assert not engine.model.training and not any(p.requires_grad for p in engine.model.parameters())
    assert engine.mode in ("generate", "paged")


def test_sleep_wake_on_cpu_keeps_weights_and_guards_generate(tiny_model):
    engine = HFEngine(tiny_model(), eos_token_ids=[], pad_token_id=0, mode="generate")
    before = greedy_tokens(engine)
    engine.sleep()
    engine.sleep()  # idempotent
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, GREEDY)
    engine.load_weights(streamed(tiny_model(seed=1).state_dict()))  # loading while asleep is allowed
    engine.load_weights(streamed(tiny_model(seed=0).state_dict()))
    engine.wake()
    assert engine.model.device.type == "cpu" and greedy_tokens(engine) == before
