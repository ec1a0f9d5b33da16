"""An optional short supervised warm start before RL, cached by a hash of everything it depends on.

The quickstart's tiny model starts from random weights; a few hundred supervised steps teach it the
answer format and some arithmetic, so that RL has signal to amplify. The gain the quickstart reports
is measured from the warm-started model, so it is RL's alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from rlcore.data import Prompts


def cache_root() -> Path:
    return Path(os.environ.get("RLCORE_CACHE", Path.home() / ".cache" / "rlcore"))


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def supervised_warmstart(model, tokenizer, prompts: Prompts, *, steps: int, lr: float, batch_size: int,
                         target_key: str, until_accuracy: float, seed: int, device: str) -> None:
    """AdamW steps of next-token loss on row[target_key] + EOS after each prompt (in place).

    Runs `steps` steps, or stops early once greedy exact-match accuracy on a fixed sample of
    *training* prompts reaches `until_accuracy` (0 = never). Stopping at an
    accuracy rather than a step count makes the starting point of RL the same whatever the seed or
    the torch build, which changes how fast a tiny model picks the task up. Checked every 25 steps.
    """
    rng = random.Random(seed)
    probe = random.Random(seed + 1).sample(range(len(prompts)), min(256, len(prompts)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    targets = [tokenizer(str(r[target_key]), add_special_tokens=False)["input_ids"] + [eos] for r in prompts.rows]
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = [rng.randrange(len(prompts)) for _ in range(batch_size)]
        seqs = [prompts.token_ids[i] + targets[i] for i in idx]
        P = max(map(len, seqs))
        input_ids = torch.full((len(seqs), P), pad, dtype=torch.long)
        labels = torch.full((len(seqs), P), -100, dtype=torch.long)
        attention = torch.zeros(len(seqs), P, dtype=torch.long)
        for b, (i, s) in enumerate(zip(idx, seqs)):
            n = len(prompts.token_ids[i])
            input_ids[b, : len(s)] = torch.tensor(s)
            labels[b, n : len(s)] = torch.tensor(targets[i])  # loss on the answer and EOS only
            attention[b, : len(s)] = 1
        loss = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), labels=labels.to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # Checked often: a tiny model can gain 20 points of accuracy within 100 steps.
        is_check = until_accuracy > 0 and (step + 1) % 25 == 0
        accuracy = train_accuracy(model, tokenizer, prompts, probe, target_key) if is_check else None
        is_done = accuracy is not None and accuracy >= until_accuracy
        if (step + 1) % 100 == 0 or step + 1 == steps or is_done:
            note = f", train accuracy {accuracy:.3f}" if accuracy is not None else ""
            print(f"warm start {step + 1}/{steps}: loss {loss.item():.3f}{note} ({time.perf_counter() - start:.0f}s)",
                  file=sys.stderr, flush=True)
        if is_done:
            break


@torch.no_grad()
def train_accuracy(model, tokenizer, prompts: Prompts, idx: list[int], target_key: str) -> float:
    """Greedy exact-match accuracy on the training prompts `idx` (left-padded batch generate)."""
    model.eval()
    device = next(model.parameters()).device
    rows = [prompts.token_ids[i] for i in idx]
    L = max(map(len, rows))
    input_ids = torch.full((len(rows), L), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, L - len(r):] = torch.tensor(r)
        attention[b, L - len(r):] = 1
    answers = [str(prompts.rows[i][target_key]).strip() for i in idx]
    max_new = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) + 1
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=False,
                         max_new_tokens=max_new, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, L:], skip_special_tokens=True)
    model.train()
    return sum(t.strip() == a for t, a in zip(texts, answers)) / len(idx)


def cached_warmstart(model, tokenizer, prompts: Prompts, key_parts: dict, **kwargs):
    """Return the warm-started model, from the cache when the same warm start was done before."""
    from transformers import AutoModelForCausalLM

    folder = cache_root() / "warmstart" / cache_key(key_parts)
    if (folder / "config.json").is_file():
        print(f"warm start: reusing {folder}", file=sys.stderr)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype, local_files_only=True).to(kwargs["device"])
    supervised_warmstart(model, tokenizer, prompts, **kwargs)
    tmp = folder.with_name(f".tmp_{folder.name}_{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "key.json").write_text(json.dumps(key_parts, sort_keys=True, default=str, indent=1))
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another run cached the same warm start first
        shutil.rmtree(tmp, ignore_errors=True)
    return model
