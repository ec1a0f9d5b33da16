"""Rollout engines behind one protocol: ``ENGINES[name](...)`` -> ``Engine``.

    from rollout import ENGINES, SamplingParams
    engine = ENGINES["hf"](copy.deepcopy(actor), eos_token_ids=[eos], pad_token_id=pad)
    engine.wake(); engine.load_weights(actor_named_full_tensors); samples = engine.generate(prompts, sp); engine.sleep()

This package never imports the trainer (``rlcore``).
"""

from .base import ENGINES, Engine, Sample, SamplingParams, get_engine, register
from .hf import HFEngine
from .vllm_engine import VLLMEngine  # imports vllm only when an engine is built

__all__ = ["ENGINES", "Engine", "HFEngine", "Sample", "SamplingParams", "VLLMEngine", "get_engine", "register"]
