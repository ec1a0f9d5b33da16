"""Metrics: TensorBoard scalars and text, metrics.jsonl in the run folder, a console progress line."""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# Shown on the console progress line, in this order, when present: (metric key, label, format).
CONSOLE_KEYS = [
    ("reward/mean", "reward", ".3f"),
    ("reward/accuracy", "acc", ".3f"),
    ("response/length_mean", "len", ".1f"),
    ("actor/kl", "kl", ".4f"),
    ("actor/entropy", "ent", ".3f"),
    ("timing/step", "s/step", ".2f"),
]


class Timer:
    """Named phase timers and peak memory: each phase becomes timing/<name> (seconds) and
    perf/peak_mem_<name> (GiB): on CUDA the allocator's peak during the phase (torch.cuda
    max_memory_allocated, reset at the phase start); on CPU the process's resident-set high-water
    mark during the phase (Linux VmHWM, reset through /proc/self/clear_refs; absent elsewhere)."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        _reset_peak(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            peak = _peak_bytes(self.device)
            if peak is not None:
                self.peaks[name] = max(self.peaks.get(name, 0.0), peak / 2**30)

    def pop(self) -> dict[str, float]:
        out = {f"timing/{k}": v for k, v in self.seconds.items()}
        out |= {f"perf/peak_mem_{k}": v for k, v in self.peaks.items()}
        self.seconds, self.peaks = {}, {}
        return out


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_bytes(device: str) -> float | None:
    import torch

    if device == "cuda":
        return float(torch.cuda.max_memory_allocated())
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Tracker:
    """Writes metrics on rank 0 only; other ranks get a tracker that does nothing."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.enabled, self.total_steps = enabled, total_steps
        self.start_step, self.start_time = start_step, time.perf_counter()
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl_path = run_dir / "metrics.jsonl"
        _truncate_jsonl(self.jsonl_path, after_step=start_step)
        # purge_step drops events a killed run wrote after its last checkpoint.
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict[str, float], extra: dict | None = None) -> None:
        """Scalars to TensorBoard and metrics.jsonl (extra: non-scalar fields for the jsonl only)."""
        if not self.enabled:
            return
        for key, value in metrics.items():
            self.tb.add_scalar(key, value, step)
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}, **(extra or {})}
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def text(self, step: int, tag: str, body: str) -> None:
        if self.enabled:
            self.tb.add_text(tag, body, step)

    def progress(self, step: int, metrics: dict[str, float]) -> None:
        """One console line: a bar, elapsed<ETA, and the key numbers."""
        if not self.enabled:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        frac = step / self.total_steps
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        parts = [f"{label} {metrics[k]:{fmt}}" for k, label, fmt in CONSOLE_KEYS if k in metrics]
        line = f"step {step:>{len(str(self.total_steps))}}/{self.total_steps} [{bar}] {_hms(elapsed)}<{_hms(eta)} | "
        print(line + " | ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"


def _jsonable(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _truncate_jsonl(path: Path, *, after_step: int) -> None:
    """On resume, drop records of steps after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= after_step]
    path.write_text("".join(line + "\n" for line in keep))
