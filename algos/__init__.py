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
    advantages.py   ADVANTAGES     "grpo", "drgrpo", "rloo"
    losses.py       POLICY_LOSSES  "vanilla" (ratio_level="token" | "sequence"), "gspo"; entropy_from_logits
    kl.py           KL_ESTIMATORS  "k1", "k2", "k3"; kl_penalty, adaptive_kl_coef
    aggregation.py  AGGREGATIONS   "token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                   "seq-mean-token-sum-norm"; aggregate, masked_mean, masked_whiten,
                                   last_masked_index
    registry.py     register / lookup and the four tables
Unregistered building blocks (their signatures differ from their axis, so a table would not be a
uniform dispatch table; the trainer imports and calls them directly):
    gae.py          gae, reinforce_pp_advantages, length_adaptive_lambda   (token rewards, critic)
    value.py        value_loss                                             (critic loss)
    shaping.py      overlong_penalty                                       (reward shaping)
    correction.py   truncated_is_weights, rollout_mismatch_metrics         (rollout mismatch, TIS)
    process.py      grpo_process_advantages, step_token_rewards            (PRM step rewards)
"""

# Importing the modules fills the registries.
from algos.registry import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, lookup, register
from algos.aggregation import aggregate, last_masked_index, masked_mean, masked_whiten
from algos.advantages import drgrpo_advantages, grpo_advantages, rloo_advantages
from algos.correction import rollout_mismatch_metrics, truncated_is_weights
from algos.gae import gae, length_adaptive_lambda, reinforce_pp_advantages
from algos.kl import adaptive_kl_coef, kl_penalty
from algos.losses import entropy_from_logits, gspo_loss, policy_loss
from algos.process import grpo_process_advantages, step_token_rewards
from algos.shaping import overlong_penalty
from algos.value import value_loss

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "KL_ESTIMATORS", "POLICY_LOSSES", "register", "lookup",
    "aggregate", "last_masked_index", "masked_mean", "masked_whiten",
    "grpo_advantages", "drgrpo_advantages", "rloo_advantages",
    "gae", "reinforce_pp_advantages", "length_adaptive_lambda", "kl_penalty", "adaptive_kl_coef", "entropy_from_logits",
    "policy_loss", "gspo_loss", "value_loss", "overlong_penalty", "truncated_is_weights",
    "rollout_mismatch_metrics", "grpo_process_advantages", "step_token_rewards",
]
