"""Outcome reward model: one scalar per (prompt, response) from a local sequence-classification checkpoint.

Input: with `apply_chat_template` and a tokenizer that has a template, the conversation
[user = prompt, assistant = response] rendered by it (tokenized without added special tokens: the
template has them); otherwise prompt + response (tokenized with special tokens). Prompts are the
raw question text here, not an already templated policy prompt.

Score: the head's logit read at the last non-pad token (the Hugging Face pooling). num_labels=1:
that logit; num_labels=2: the margin logit_1 - logit_0, so that normalize="sigmoid" gives exactly
p(class 1) = softmax(logits)[1], and both heads read like a Bradley-Terry reward. The pooling takes
the rightmost token whose id is not the pad id, as in training; inputs are right-padded with the
config's pad_token_id (set from the tokenizer's pad token, else EOS, when the config has none).
`max_length` truncates from the left: the head reads the end of the response, so that is kept.
"""

import copy
from collections.abc import Sequence

import torch
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2ForSequenceClassification,
)

from rewards.prm import DTYPES, check_checkpoint, load_tokenizer, on_device, right_pad, tiny_qwen2_config

NORMALIZATIONS = ("none", "sigmoid", "batch")
BATCH_NORM_EPS = 1e-6


class OutcomeRewardModel:
    """Scores (prompt, response) pairs with a local AutoModelForSequenceClassification (see the module docstring).

    normalize: "none" = the raw score; "sigmoid" = sigmoid(score) in (0, 1); "batch" = z-score over
    the call's batch, (s - mean) / (std + 1e-6) with the unbiased std, and 0.0 for a batch of one.
    With `offload=True` the model lives on the CPU and moves to `device` only inside a call.
    """

    def __init__(
        self,
        path: str,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
        apply_chat_template: bool = True,
        normalize: str = "none",
        offload: bool = True,
        max_length: int | None = None,
        trust_remote_code: bool = False,
    ):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"orm normalize={normalize!r}: expected one of {', '.join(NORMALIZATIONS)}")
        if dtype not in DTYPES:
            raise ValueError(f"orm dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
        if batch_size < 1:
            raise ValueError(f"orm batch_size must be >= 1, got {batch_size}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"orm max_length must be >= 1 or None, got {max_length}")
        self.batch_size, self.normalize, self.max_length = batch_size, normalize, max_length
        self.device, self.offload = torch.device(device), offload

        check_checkpoint(path, "orm")
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        self.tokenizer.truncation_side = "left"
        self._use_template = apply_chat_template and self.tokenizer.chat_template is not None
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=DTYPES[dtype], local_files_only=True, trust_remote_code=trust_remote_code
        ).eval()
        self.num_labels = self.model.config.num_labels
        if self.num_labels not in (1, 2):
            raise ValueError(f"orm {path}: num_labels={self.num_labels}; expected 1 (a score) or 2 (p(class 1))")
        config = self.model.config.get_text_config()
        if config.pad_token_id is None:
            # Without one, the pooling cannot find the last real token of a padded sequence.
            pad = self.tokenizer.pad_token_id
            pad = self.tokenizer.eos_token_id if pad is None else pad
            if pad is None:
                raise ValueError(f"orm {path}: neither the config nor the tokenizer has a pad or EOS token")
            config.pad_token_id = pad
        self._pad_id = config.pad_token_id
        if not offload:
            self.model.to(self.device)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts and {len(responses)} responses; need one each per sample")
        if not responses:
            return []
        scores = self._score([self._input_text(p, r) for p, r in zip(prompts, responses)])
        if self.normalize == "sigmoid":
            return torch.tensor(scores, dtype=torch.float64).sigmoid().tolist()
        if self.normalize == "batch":
            if len(scores) == 1:
                return [0.0]
            s = torch.tensor(scores, dtype=torch.float64)
            return ((s - s.mean()) / (s.std(unbiased=True) + BATCH_NORM_EPS)).tolist()
        return scores

    def _input_text(self, prompt: str, response: str) -> str:
        if not self._use_template:
            return prompt + response
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    @torch.inference_mode()
    def _score(self, texts: list[str]) -> list[float]:
        enc = self.tokenizer(texts, add_special_tokens=not self._use_template,
                             truncation=self.max_length is not None, max_length=self.max_length)
        scores = []
        with on_device(self.model, self.device, self.offload):
            for i in range(0, len(texts), self.batch_size):
                input_ids, attention_mask = right_pad(enc["input_ids"][i : i + self.batch_size], self._pad_id,
                                                      self.device)
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                logits = logits.float()  # (B, num_labels)
                score = logits[:, 0] if self.num_labels == 1 else logits[:, 1] - logits[:, 0]
                scores.extend(score.tolist())
        return scores


def build_tiny_orm(
    tokenizer: PreTrainedTokenizerBase, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 1
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A random-init Qwen2ForSequenceClassification (num_labels=1) over a copy of `tokenizer`."""
    tok = copy.deepcopy(tokenizer)
    config = tiny_qwen2_config(tok, hidden_size=hidden_size, num_layers=num_layers, num_labels=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForSequenceClassification(config)
    return model.eval(), tok
