"""RL algorithm math for LLM post-training: pure functions on tensors.

Imports only torch. No I/O, no distributed calls, no config objects: hyperparameters are
keyword-only scalars, and the trainer picks functions by name from the registries below.

Notation for tensor shapes, used by every docstring in this package:
    B  sequences (responses) in the batch
    T  response tokens (right-padded length)
    G  group size (responses sampled for one prompt)
    V  vocabulary size
    mask (B, T): 1 on generated tokens including EOS, 0 after (float or bool; may also be 0 inside
    a response, e.g. on tool-observation tokens). L_b = Σ_t mask[b, t].

Modules (one axis each):
    advantages.py   ADVANTAGES     "grpo", "drgrpo"
    losses.py       POLICY_LOSSES  "vanilla"; entropy_from_logits
    kl.py           KL_ESTIMATORS  "k1", "k2", "k3"; kl_penalty
    aggregation.py  AGGREGATIONS   "token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                   "seq-mean-token-sum-norm"; aggregate, masked_mean
    registry.py     register / lookup and the four tables
"""

# Importing the modules fills the registries.
from algos.registry import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, lookup, register
from algos.aggregation import aggregate, masked_mean
from algos.advantages import drgrpo_advantages, grpo_advantages
from algos.kl import kl_penalty
from algos.losses import entropy_from_logits, policy_loss

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "KL_ESTIMATORS", "POLICY_LOSSES", "register", "lookup",
    "aggregate", "masked_mean", "grpo_advantages", "drgrpo_advantages", "kl_penalty",
    "entropy_from_logits", "policy_loss",
]
