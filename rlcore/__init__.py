"""rlcore: reinforcement-learning post-training for LLMs (the trainer package)."""

__version__ = "0.1.0"
