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
from rlcore.toolcall import ToolTurns


def cache_root() -> Path:
    return Path(os.environ.get("RLCORE_CACHE", Path.home() / ".cache" / "rlcore"))


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def supervised_warmstart(model, tokenizer, prompts: Prompts, *, steps: int, lr: float, batch_size: int,
                         target_key: str, until_accuracy: float, seed: int, device: str,
                         check_every: int = 25) -> None:
    """AdamW steps of next-token loss on row[target_key] + EOS after each prompt (in place).

    row[target_key] is a text, or a tool-use trace (a list of chat messages, rlcore.tasks.tool_trace):
    see target_tokens.
    Runs `steps` steps, or stops early once greedy exact-match accuracy on a fixed sample of
    *training* prompts reaches `until_accuracy` (0 = never; with traces: of their first turn). Stopping
    at an accuracy rather than a step count makes the starting point of RL the same whatever the seed
    or the torch build, which changes how fast a tiny model picks the task up. Checked every
    `check_every` steps.
    """
    rng = random.Random(seed)
    probe = random.Random(seed + 1).sample(range(len(prompts)), min(256, len(prompts)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id
    targets = target_tokens(tokenizer, [r[target_key] for r in prompts.rows])
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = [rng.randrange(len(prompts)) for _ in range(batch_size)]
        seqs = [prompts.token_ids[i] + targets[i][0] for i in idx]
        P = max(map(len, seqs))
        input_ids = torch.full((len(seqs), P), pad, dtype=torch.long)
        labels = torch.full((len(seqs), P), -100, dtype=torch.long)
        attention = torch.zeros(len(seqs), P, dtype=torch.long)
        for b, (i, s) in enumerate(zip(idx, seqs)):
            n = len(prompts.token_ids[i])
            input_ids[b, : len(s)] = torch.tensor(s)
            labels[b, n : len(s)] = torch.tensor(targets[i][1])  # loss on the answer's model tokens and EOS only
            attention[b, : len(s)] = 1
        loss = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), labels=labels.to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # Checked often: a tiny model can gain 20 points of accuracy within 100 steps.
        is_check = until_accuracy > 0 and (step + 1) % check_every == 0
        accuracy = train_accuracy(model, tokenizer, prompts, probe, target_key) if is_check else None
        is_done = accuracy is not None and accuracy >= until_accuracy
        if (step + 1) % 100 == 0 or step + 1 == steps or is_done:
            note = f", train accuracy {accuracy:.3f}" if accuracy is not None else ""
            print(f"warm start {step + 1}/{steps}: loss {loss.item():.3f}{note} ({time.perf_counter() - start:.0f}s)",
                  file=sys.stderr, flush=True)
        if is_done:
            break


def target_tokens(tokenizer, targets: list) -> list[tuple[list[int], list[int]]]:
    """Per target: (token ids after the prompt, their labels: the id where trained, -100 where not).

    A text: its tokens and EOS, all trained. A trace of chat messages: assistant messages are the
    model's tokens (trained); each tool message becomes the tokens the chat template inserts around the
    tool's output (rlcore.toolcall.ToolTurns, exactly as rollouts insert them; not trained), except that
    the position where the tool turn starts is trained to predict EOS: the model learns to end its turn
    at the call, while the sequence goes on with the tool turn as in a rollout (which cuts the turn
    after the call, so that EOS is never in a trajectory). EOS follows the last message."""
    eos, turns = tokenizer.eos_token_id, None
    out = []
    for i, target in enumerate(targets):
        if not isinstance(target, list):
            ids = tokenizer(str(target), add_special_tokens=False)["input_ids"] + [eos]
            out.append((ids, list(ids)))
            continue
        ids, labels = [], []
        for m in target:
            if m.get("role") == "assistant":
                part = tokenizer(m["content"], add_special_tokens=False)["input_ids"]
                ids, labels = ids + part, labels + part
            elif m.get("role") == "tool":
                turns = turns or ToolTurns(tokenizer)
                part = turns.ids(m.get("name") or "tool", m["content"])
                ids, labels = ids + part, labels + [eos] + [-100] * (len(part) - 1)
            else:
                raise ValueError(f"warm-start target {i}: message roles must be assistant or tool, "
                                 f"got {m.get('role')!r}")
        out.append((ids + [eos], labels + [eos]))
    return out


def _expected_text(target) -> str:
    """What train_accuracy compares with: the text, or a trace's first assistant turn."""
    if isinstance(target, list):
        return next(m["content"] for m in target if m.get("role") == "assistant")
    return str(target)


@torch.no_grad()
def train_accuracy(model, tokenizer, prompts: Prompts, idx: list[int], target_key: str) -> float:
    """Greedy exact-match accuracy on the training prompts `idx` (left-padded batch generate); with
    tool-use traces, of the first turn (the call: the tools do not run here)."""
    model.eval()
    device = next(model.parameters()).device
    rows = [prompts.token_ids[i] for i in idx]
    L = max(map(len, rows))
    input_ids = torch.full((len(rows), L), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, L - len(r):] = torch.tensor(r)
        attention[b, L - len(r):] = 1
    answers = [_expected_text(prompts.rows[i][target_key]).strip() for i in idx]
    max_new = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) + 1
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=False,
                         max_new_tokens=max_new, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, L:], skip_special_tokens=True)
    model.train()
    # A trace's first turn is followed by the template's tokens, not EOS: what comes after it is free.
    traces = [isinstance(prompts.rows[i][target_key], list) for i in idx]
    return sum(t.startswith(a) if trace else t.strip() == a for t, a, trace in zip(texts, answers, traces)) / len(idx)


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
