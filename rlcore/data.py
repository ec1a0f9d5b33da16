"""Prompt data: local files through `datasets`, or a built-in synthetic task; seeded sampling.

Every row problem is reported with the file, the row number (1-based, as editors count; in a jsonl
the n-th non-blank line) and the key, before any training. Prompts the tokenizer cannot encode in
full (characters outside the built-in tokenizer's printable ASCII, or mapped to a tokenizer's unknown
token) are dropped and counted, like prompts over data.max_prompt_tokens, never trained on changed.
"""

from __future__ import annotations

import json
import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlcore.config import DataConfig
from rlcore.tasks import TASKS

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A data file or row the run cannot use; the message says which and what to do."""


@dataclass(frozen=True)
class Prompts:
    """Tokenised prompts with the rows the rewards need (parallel lists)."""

    rows: list[dict[str, Any]]
    texts: list[str]
    token_ids: list[list[int]]
    num_dropped: int
    """Prompts longer than data.max_prompt_tokens, dropped."""
    num_unencodable: int = 0
    """Prompts holding characters the tokenizer cannot encode, dropped."""
    unencodable_note: str = ""
    """Where the first of those is and which characters, for the run's warning; empty if none."""

    def __len__(self) -> int:
        return len(self.rows)


def read_rows(path: str) -> list[dict[str, Any]]:
    """All rows of one local file or saved dataset folder."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {path!r} does not exist; fix data.train_files / data.eval_files")
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    else:
        fmt = FORMATS.get(p.suffix)
        if fmt is None:
            raise DataError(f"data file {path!r}: unknown format {p.suffix!r}; use one of {sorted(FORMATS)}")
        if p.stat().st_size == 0:
            raise DataError(f"data file {path!r} is empty; it needs one row per prompt")
        try:
            ds = datasets.load_dataset(fmt, data_files=str(p), split="train")
        except Exception as e:  # datasets wraps parse errors in several types, without the row
            bad_line = _first_bad_json_line(p) if p.suffix == ".jsonl" else None
            raise DataError(bad_line or f"data file {path!r} could not be read as {fmt}: {e}") from e
    if len(ds) == 0:
        raise DataError(f"data file {path!r} holds no rows; it needs one row per prompt")
    return ds.to_list()


def _first_bad_json_line(path: Path) -> str | None:
    """The error naming the first line of a jsonl that is not a JSON object (1-based row and line)."""
    row = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines are skipped when reading, and not counted as rows
            row += 1
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                return (f"data file {str(path)!r} row {row} (line {line_number}) is not valid JSON: {e.msg} at "
                        f"column {e.colno}; fix or remove that line")
            if not isinstance(value, dict):
                return (f"data file {str(path)!r} row {row} (line {line_number}) is a JSON {type(value).__name__}, "
                        "not an object with the prompt and answer fields")
    if row == 0:
        return f"data file {str(path)!r} holds only blank lines; it needs one JSON object per line"
    return None


def _prompt_text(row: dict, cfg: DataConfig, tokenizer, where: str, tools: list[dict] | None = None) -> str:
    key = cfg.messages_key or cfg.prompt_key
    value = row.get(key)
    if value is None:
        raise DataError(
            f"{where}: no field {key!r} (row has {sorted(row)}); set data."
            f"{'messages_key' if cfg.messages_key else 'prompt_key'} to the field holding the prompt"
        )
    missing = [f for f in cfg.fields if row.get(f) is None]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing} that data.fields says the rewards need")
    # The tools' JSON schemas go to the template, which describes them to the model where it can
    # (Qwen, Hermes: a system block); the built-in character template leaves them out.
    if cfg.messages_key:
        return tokenizer.apply_chat_template(value, tools=tools, tokenize=False, add_generation_prompt=True)
    if cfg.apply_chat_template:
        messages = [{"role": "user", "content": str(value)}]
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    return str(value)


def tokenize_prompts(rows: list[dict], tokenizer, cfg: DataConfig, source: str,
                     tools: list[dict] | None = None) -> Prompts:
    """Check and tokenise rows; over-long prompts and prompts with characters the tokenizer cannot
    encode are dropped and counted. Row numbers in messages are 1-based. tools: JSON schemas for the
    chat template (rollout.tools)."""
    kept_rows, texts, ids, dropped = [], [], [], 0
    lost_chars = _LostCharacters(tokenizer)
    unencodable, note = 0, ""
    for i, row in enumerate(rows):
        where = f"{source} row {i + 1}"
        text = _prompt_text(row, cfg, tokenizer, where, tools)
        lost = lost_chars(text)
        if lost:
            unencodable += 1
            note = note or (f"{where}: the tokenizer cannot encode {''.join(sorted(lost))!r}; prompts holding such "
                            "characters are dropped (data/unencodable_prompts)")
            continue
        # A chat template already carries the special tokens it needs.
        tokens = tokenizer(text, add_special_tokens=not cfg.apply_chat_template)["input_ids"]
        if len(tokens) > cfg.max_prompt_tokens:
            dropped += 1
            continue
        if not tokens:
            raise DataError(f"{where}: the prompt is empty")
        kept_rows.append(row)
        texts.append(text)
        ids.append(tokens)
    if not kept_rows:
        raise DataError(f"{source}: no usable prompts ({dropped} longer than data.max_prompt_tokens, {unencodable} "
                        f"with characters the tokenizer cannot encode{'; ' + note if note else ''})")
    return Prompts(kept_rows, texts, ids, dropped, unencodable, note)


class _LostCharacters:
    """The characters of a text that the tokenizer loses: encoded to nothing (the built-in character
    tokenizer outside printable ASCII) or to its unknown token. Invisible characters (control, format,
    separators) are not counted: tokenizers normalise those away without changing the text's meaning.
    Each distinct character is encoded once."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, {}
        self.unk = getattr(tokenizer, "unk_token_id", None)

    def __call__(self, text: str) -> set[str]:
        return {c for c in set(text) if self._is_lost(c)}

    def _is_lost(self, c: str) -> bool:
        if c not in self.seen:
            visible = unicodedata.category(c)[0] not in "CZ"
            ids = self.tokenizer(c, add_special_tokens=False)["input_ids"] if visible else [0]
            self.seen[c] = not ids or (self.unk is not None and self.unk in ids and c != self.tokenizer.unk_token)
        return self.seen[c]


def load_prompts(cfg: DataConfig, tokenizer, *, seed: int, tools: list[dict] | None = None
                 ) -> tuple[Prompts, Prompts | None]:
    """(train, eval) prompts from data.train_files / eval_files, or from the synthetic task; tools:
    the JSON schemas of rollout.tools, for the chat template."""
    if not cfg.train_files:
        task = TASKS[cfg.task.name](num_digits=cfg.task.num_digits, ops=cfg.task.ops,
                                    answer_format=cfg.task.answer_format)
        source = f"task {cfg.task.name}"
        train = tokenize_prompts(task.rows("train", cfg.task.num_train, seed), tokenizer, cfg, source, tools)
        evals = task.rows("eval", min(cfg.task.num_eval, cfg.max_eval_prompts), seed)
        return train, tokenize_prompts(evals, tokenizer, cfg, source + " (eval)", tools)
    train = _load_files(cfg.train_files, tokenizer, cfg, tools)
    if not cfg.eval_files:
        return train, None
    evals = _load_files(cfg.eval_files, tokenizer, cfg, tools)
    n = min(len(evals), cfg.max_eval_prompts)
    return train, Prompts(evals.rows[:n], evals.texts[:n], evals.token_ids[:n], evals.num_dropped,
                          evals.num_unencodable, evals.unencodable_note)


def _load_files(files: list[str], tokenizer, cfg: DataConfig, tools: list[dict] | None = None) -> Prompts:
    parts = [tokenize_prompts(read_rows(f), tokenizer, cfg, f"data file {f!r}", tools) for f in files]
    return Prompts(
        [r for p in parts for r in p.rows],
        [t for p in parts for t in p.texts],
        [t for p in parts for t in p.token_ids],
        sum(p.num_dropped for p in parts),
        sum(p.num_unencodable for p in parts),
        next((p.unencodable_note for p in parts if p.unencodable_note), ""),
    )


class PromptSampler:
    """Seeded epoch shuffling over prompt indices; its state (epoch, position) is checkpointed.

    Every rank draws the same global batch and keeps its own contiguous slice, so a group's
    samples stay on one rank and the data order does not depend on the rank count.
    """

    def __init__(self, num_prompts: int, *, seed: int, rank: int = 0, world_size: int = 1):
        self.num_prompts, self.seed, self.rank, self.world_size = num_prompts, seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(self.num_prompts))
        random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return order

    def next_batch(self, num_prompts: int) -> list[int]:
        """The next `num_prompts` global indices (crossing epochs), then this rank's slice."""
        batch = []
        while len(batch) < num_prompts:
            if self.position == self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            take = min(num_prompts - len(batch), self.num_prompts - self.position)
            batch += self._order[self.position : self.position + take]
            self.position += take
        per_rank = num_prompts // self.world_size
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_prompts": self.num_prompts}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_prompts"] != self.num_prompts:
            raise DataError(
                f"the checkpoint was taken with {state['num_prompts']} prompts but the data now has "
                f"{self.num_prompts}; resume with the same data, or start a new run (trainer.resume=never)"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled(self.epoch)
