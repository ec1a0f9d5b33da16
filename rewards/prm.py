"""Process reward models (spec §6): a score in [0, 1] for each reasoning step, from a local checkpoint.

Conventions (`convention=`), with the exact PRM input each one builds from a question and the
response's steps (`split_steps` on `separator`, each step's text stripped of its separator and of
surrounding whitespace; the PRM's own separator replaces the policy's):

- "qwen" (Qwen2.5-Math-PRM, arXiv 2501.07301): the chat [system = `system_prompt`, user = question,
  assistant = step_1 + T + step_2 + T + ... + step_K + T], T = `step_token` ("<extra_0>"), rendered
  by the PRM tokenizer's chat template (tokenized without added special tokens: the template has
  them). A tokenizer without a template gets the plain join f"{system}\\n{question}\\n{assistant}"
  (tokenized with special tokens). The model has a 2-class token head, logits (B, T, 2); step score
  = softmax(logits)[pos, 1] (class 1 = correct) at each T.
- "shepherd" (Math-Shepherd, arXiv 2312.08935): a causal LM on
  f"{question} {step_1} {tag}\\n{step_2} {tag}\\n...{step_K} {tag}" (tag = `step_tag`, "ки"; no
  trailing newline; tokenized with special tokens, i.e. BOS). Step score = softmax over the LM
  logits of (`good_token`, `bad_token`) = ("+", "-") at each tag position, keep p(good).

Alignment is by construction, never by counting ids: the character offset where each step token
was inserted is matched to the token covering it (fast-tokenizer offsets). So a step token that
occurs inside a step's own text is not scored (only ours are). When `max_length` truncates the PRM
input, the steps whose token was cut off are not scored: `StepScores` leaves them out (their scores
and char_ends both; `num_unscored` counts them) and a warning is logged. An inserted token that the
tokenizer merged with neighbouring text raises (choose a step token that stays one token).
"""

import copy
import inspect
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForTokenClassification,
)

from rewards.steps import split_steps

logger = logging.getLogger(__name__)

CONVENTIONS = ("qwen", "shepherd")
QWEN_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_STEP_TOKEN = "<extra_0>"
SHEPHERD_STEP_TAG, SHEPHERD_GOOD, SHEPHERD_BAD = "ки", "+", "-"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class StepScores:
    """PRM scores for B responses.

    scores: per sample, per scored step, p(step correct) in [0, 1].
    char_ends: per sample, per scored step, the step's end offset in the response (`split_steps`).
    num_unscored: per sample, steps left out because `max_length` cut their step token off (they
    are the last steps; scores[b] and char_ends[b] always have the same length).
    """

    scores: list[list[float]]
    char_ends: list[list[int]]
    num_unscored: list[int]


class ProcessRewardModel:
    """Scores the steps of (question, response) pairs with a local PRM (see the module docstring).

    Nothing is downloaded (`local_files_only=True`). With `offload=True` the model lives on the
    CPU and moves to `device` only during `score_steps` (a no-op when device is "cpu"). The
    qwen convention loads AutoModelForTokenClassification when the config's architectures name a
    *ForTokenClassification class; anything else (the real Qwen2ForProcessRewardModel) needs
    `trust_remote_code=True` and is loaded with AutoModel. Needs a fast tokenizer (offsets).
    """

    def __init__(
        self,
        path: str,
        *,
        convention: str = "qwen",
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
        offload: bool = True,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        separator: str = "\n\n",
        system_prompt: str = QWEN_SYSTEM_PROMPT,
        step_token: str = QWEN_STEP_TOKEN,
        step_tag: str = SHEPHERD_STEP_TAG,
        good_token: str = SHEPHERD_GOOD,
        bad_token: str = SHEPHERD_BAD,
    ):
        if convention not in CONVENTIONS:
            raise ValueError(f"prm convention={convention!r}: expected one of {', '.join(CONVENTIONS)}")
        if batch_size < 1:
            raise ValueError(f"prm batch_size must be >= 1, got {batch_size}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"prm max_length must be >= 1 or None, got {max_length}")
        if not separator:
            raise ValueError("prm separator must be a non-empty string")
        self.convention, self.batch_size, self.max_length = convention, batch_size, max_length
        self.separator, self.system_prompt = separator, system_prompt
        self.device, self.offload = torch.device(device), offload

        check_checkpoint(path, "prm")
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        if not self.tokenizer.is_fast:
            raise ValueError(f"prm {path}: needs a fast tokenizer (character offsets locate the step tokens)")
        self.tokenizer.truncation_side = "right"  # keep the question and the first steps
        if convention == "qwen":
            self.step_text = step_token
            self.step_id = single_token_id(self.tokenizer, step_token, "step_token")
        else:
            self.step_text = step_tag
            self.step_id = single_token_id(self.tokenizer, step_tag, "step_tag")
            self.good_bad_ids = [single_token_id(self.tokenizer, good_token, "good_token"),
                                 single_token_id(self.tokenizer, bad_token, "bad_token")]
        # The template already holds its special tokens; the plain formats get BOS etc. added.
        self._use_template = convention == "qwen" and self.tokenizer.chat_template is not None
        self._add_special_tokens = not self._use_template
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        self.model = self._load_model(path, dtype, trust_remote_code)
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        if not offload:
            self.model.to(self.device)

    def _load_model(self, path: str, dtype: str, trust_remote_code: bool) -> PreTrainedModel:
        if dtype not in DTYPES:
            raise ValueError(f"prm dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
        kwargs = {"dtype": DTYPES[dtype], "local_files_only": True, "trust_remote_code": trust_remote_code}
        if self.convention == "shepherd":
            return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
        architectures = AutoConfig.from_pretrained(path, **kwargs).architectures or []
        if any(a.endswith("ForTokenClassification") for a in architectures):
            return AutoModelForTokenClassification.from_pretrained(path, **kwargs).eval()
        if not trust_remote_code:
            # AutoModel would silently load the bare backbone (hidden states, not 2-class logits).
            raise ValueError(
                f"prm {path}: architectures {architectures} is not a token-classification model; a PRM with "
                "its own head (Qwen2ForProcessRewardModel) needs trust_remote_code=True"
            )
        return AutoModel.from_pretrained(path, **kwargs).eval()

    def score_steps(self, prompts: Sequence[str], responses: Sequence[str]) -> StepScores:
        """Step scores of each response; prompts are the questions (raw text, no chat template)."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts and {len(responses)} responses; need one each per sample")
        all_ends, texts, tag_ends, owners = [], [], [], []
        for b, (prompt, response) in enumerate(zip(prompts, responses)):
            spans = split_steps(response, self.separator)
            all_ends.append([end for _, end in spans])
            if spans:
                steps = [response[s:e].removesuffix(self.separator).strip() for s, e in spans]
                text, ends = self._prm_input(prompt, steps)
                texts.append(text)
                tag_ends.append(ends)
                owners.append(b)

        encoded = self._encode(texts, tag_ends, owners)
        probs = self._score_encoded(encoded) if encoded else []
        scores = [[] for _ in responses]
        num_unscored = [0] * len(responses)
        for b, step_probs in zip(owners, probs):
            scores[b] = step_probs
            num_unscored[b] = len(all_ends[b]) - len(step_probs)
            all_ends[b] = all_ends[b][: len(step_probs)]
        if any(num_unscored):
            logger.warning("prm: max_length=%s cut off %d steps in %d of %d samples; they are not scored",
                           self.max_length, sum(num_unscored), sum(map(bool, num_unscored)), len(responses))
        return StepScores(scores=scores, char_ends=all_ends, num_unscored=num_unscored)

    def _prm_input(self, question: str, steps: list[str]) -> tuple[str, list[int]]:
        """The PRM input text and the end offset (in it) of each inserted step token."""
        if self.convention == "shepherd":
            text, ends = f"{question} ", []
            for j, step in enumerate(steps):
                text += ("\n" if j else "") + f"{step} {self.step_text}"
                ends.append(len(text))
            return text, ends
        content, ends = "", []
        for step in steps:
            content += step + self.step_text
            ends.append(len(content))
        if not self._use_template:
            text = f"{self.system_prompt}\n{question}\n{content}"
        else:
            messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": question},
                        {"role": "assistant", "content": content}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        base = text.rfind(content)
        if base < 0:
            raise ValueError("prm: the chat template changed the assistant content, so the step tokens cannot be "
                             "located; use a template that inserts message content verbatim")
        return text, [base + end for end in ends]

    def _encode(
        self, texts: list[str], tag_ends: list[list[int]], owners: list[int]
    ) -> list[tuple[list[int], list[int]]]:
        """(input_ids, token position of each scored step) per text."""
        if not texts:
            return []
        enc = self.tokenizer(texts, add_special_tokens=self._add_special_tokens, return_offsets_mapping=True,
                             truncation=self.max_length is not None, max_length=self.max_length)
        out = []
        for ids, offsets, ends, b in zip(enc["input_ids"], enc["offset_mapping"], tag_ends, owners):
            out.append((ids, self._step_positions(ids, offsets, ends, b)))
        return out

    def _step_positions(self, ids: list[int], offsets: list[tuple[int, int]], ends: list[int], b: int) -> list[int]:
        """Index of the token that covers the last character of each inserted step token."""
        found = [(s, e, i) for i, ((s, e), t) in enumerate(zip(offsets, ids)) if t == self.step_id]
        covered = max((e for _, e in offsets), default=0)  # with truncation, the text kept
        positions = []
        for j, end in enumerate(ends):
            position = next((i for s, e, i in found if s < end <= e), None)
            if position is None:
                if end > covered:
                    break  # cut off by max_length: this step and all later ones
                raise ValueError(
                    f"prm: sample {b} step {j}: the inserted step token {self.step_text!r} was tokenized together "
                    "with neighbouring text, so it cannot be scored; choose a step token that stays one token"
                )
            positions.append(position)
        return positions

    @torch.inference_mode()
    def _score_encoded(self, encoded: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        probs = []
        with on_device(self.model, self.device, self.offload):
            for i in range(0, len(encoded), self.batch_size):
                probs.extend(self._score_batch(encoded[i : i + self.batch_size]))
        return probs

    def _score_batch(self, batch: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        # Right padding: positions match the unpadded input, and causal attention never sees the pads.
        input_ids, attention_mask = right_pad([ids for ids, _ in batch], self._pad_id, self.device)
        if self.convention == "qwen":
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out[0]  # (B, T, 2)
            if logits.ndim != 3 or logits.shape[-1] != 2:
                raise ValueError(f"prm (qwen): expected token logits (B, T, 2), got shape {tuple(logits.shape)}")
            correct = logits.float().softmax(-1)[..., 1]  # (B, T)
            return [correct[b, positions].tolist() for b, (_, positions) in enumerate(batch)]
        keep = sorted({p for _, positions in batch for p in positions})
        if not keep:  # every step cut off by max_length
            return [[] for _ in batch]
        kwargs = {}
        if self._keeps_logits:
            # Only the tag positions need the vocabulary projection: their union, (K,).
            kwargs["logits_to_keep"] = torch.tensor(keep, device=self.device)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
        if not self._keeps_logits:
            logits = logits[:, keep]  # (B, T, V) -> (B, K, V)
        column = {p: k for k, p in enumerate(keep)}
        good = logits[..., self.good_bad_ids].float().softmax(-1)[..., 0]  # (B, K)
        return [good[b, [column[p] for p in positions]].tolist() for b, (_, positions) in enumerate(batch)]


# ---- outcome use: one number per response

AGGREGATIONS: dict[str, Callable[[Sequence[float]], float]] = {
    "min": min,  # Math-Shepherd's verification score: a solution is as good as its worst step
    "last": lambda s: s[-1],
    "mean": lambda s: sum(s) / len(s),
    "product": math.prod,
}


def aggregate(step_scores: Sequence[float], how: str) -> float:
    """One outcome score from a response's step scores; a response with no steps scores 0.0 (no credit)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown step aggregation {how!r}; valid: {', '.join(AGGREGATIONS)}")
    return float(AGGREGATIONS[how](step_scores)) if len(step_scores) else 0.0


# ---- tiny PRM for CPU recipes and tests

def build_tiny_prm(
    tokenizer: PreTrainedTokenizerBase, *, convention: str, seed: int = 0, hidden_size: int = 64, num_layers: int = 1
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A random-init Qwen2 PRM over a copy of `tokenizer`: qwen -> Qwen2ForTokenClassification
    (num_labels=2), shepherd -> Qwen2ForCausalLM (untied head). The default step token (qwen) or
    tag, "+" and "-" (shepherd) are added as special tokens when they are not single tokens."""
    if convention not in CONVENTIONS:
        raise ValueError(f"prm convention={convention!r}: expected one of {', '.join(CONVENTIONS)}")
    tok = copy.deepcopy(tokenizer)
    needed = [QWEN_STEP_TOKEN] if convention == "qwen" else [SHEPHERD_STEP_TAG, SHEPHERD_GOOD, SHEPHERD_BAD]
    missing = [t for t in needed if not is_single_token(tok, t)]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    if convention == "qwen":
        config = tiny_qwen2_config(tok, hidden_size=hidden_size, num_layers=num_layers, num_labels=2)
        model_cls = Qwen2ForTokenClassification
    else:
        config = tiny_qwen2_config(tok, hidden_size=hidden_size, num_layers=num_layers)
        model_cls = Qwen2ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval(), tok


# ---- shared with rewards.orm

def tiny_qwen2_config(tok: PreTrainedTokenizerBase, *, hidden_size: int, num_layers: int, **kwargs) -> Qwen2Config:
    """A small Qwen2 config over `tok` (4 heads, 2 KV heads, untied embeddings, pad = tok's pad or EOS)."""
    if hidden_size % 8:
        raise ValueError(f"hidden_size must be a multiple of 8 (4 heads of even size), got {hidden_size}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
        **kwargs,
    )


def check_checkpoint(path: str, what: str) -> None:
    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"{what} path={path!r}: no config.json there; point it at a local Hugging Face "
                                "checkpoint folder (nothing is downloaded)")


def load_tokenizer(path: str, *, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer as saved.

    A tokenizer saved as the generic backend (tokenizer_class "TokenizersBackend", e.g. the char
    tokenizer of a tiny model) is loaded as that: AutoTokenizer in transformers 5 swaps in the model
    type's own class for some types (qwen2), which rebuilds the pre-tokenizer and drops whitespace.
    """
    config_file = Path(path, "tokenizer_config.json")
    declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast") and Path(path, "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)


def is_single_token(tok: PreTrainedTokenizerBase, text: str) -> bool:
    """True if `text` encodes to one id that decodes back to it (an unknown token does not)."""
    ids = tok.encode(text, add_special_tokens=False)
    return len(ids) == 1 and tok.decode(ids).strip() == text.strip()


def single_token_id(tok: PreTrainedTokenizerBase, text: str, arg: str) -> int:
    if not is_single_token(tok, text):
        ids = tok.encode(text, add_special_tokens=False)
        raise ValueError(f"prm {arg}={text!r} is not a single token of the PRM tokenizer (it encodes to {ids}); "
                         f"set {arg} to a token the PRM was trained with")
    return tok.encode(text, add_special_tokens=False)[0]


def right_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (B, T) right-padded with pad_id, attention_mask (B, T)."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[b, : len(s)] = 1
    return input_ids.to(device), attention_mask.to(device)


@contextmanager
def on_device(model: torch.nn.Module, device: torch.device, offload: bool) -> Iterator[None]:
    """With offload, move `model` to `device` for the block and back to the CPU after (no-op on CPU)."""
    move = offload and device.type != "cpu"
    if move:
        model.to(device)
    try:
        yield
    finally:
        if move:
            model.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
