"""`rlcore train | ls | export`: the command line.

    rlcore train [RECIPE|PATH] [key=value ...]   no recipe: the quickstart
    rlcore plan [RECIPE|PATH] [key=value ...] [--device-gb N]
                                                 memory per rank and phase, before anything loads
    rlcore ls                                    recipes, algorithms, rewards, engines, tools, tasks
    rlcore export RUN_OR_CHECKPOINT OUT          a Hugging Face folder, checked by reloading
"""

from __future__ import annotations

from rlcore.cpu import apply_cpu_defaults

apply_cpu_defaults()  # before anything below imports torch (its OpenMP runtime reads them once, at load)

import json
import sys
import time
from pathlib import Path

from rlcore import interrupts
from rlcore.data import DataError
from rlcore.guard import NonFiniteError, RewardTermFailed
from rlcore.manifest import DamagedCheckpoint
from rlcore.recipe import ConfigError, builtin_recipes, compose, field_docs, recipes_dir, to_yaml
from rlcore.runlock import RunFolderBusy

USER_ERRORS = (ConfigError, DataError, FileNotFoundError, FileExistsError, RunFolderBusy, DamagedCheckpoint)
# The run stopped itself rather than train on garbage: the message says why and what to change.
RUN_STOPS = (NonFiniteError, RewardTermFailed)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    command, rest = argv[0], argv[1:]
    _quiet_transformers()
    try:
        if command == "train":
            return train(rest)
        if command == "plan":
            return plan(rest)
        if command == "ls":
            return ls()
        if command == "export":
            return export(rest)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RUN_STOPS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the run started (composing, validating): nothing to resume
        print("interrupted", file=sys.stderr)
        return interrupts.EXIT_CODE
    print(f"error: unknown command {command!r}\n\n{__doc__.strip()}", file=sys.stderr)
    return 2


def _quiet_transformers() -> None:
    # Per-file load/save progress bars drown the training progress line.
    from transformers.utils import logging

    logging.disable_progress_bar()


def train(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print("rlcore train [RECIPE|PATH] [key=value ...]\n\nKeys (default) and what they do:")
        for key, default, doc in field_docs():
            print(f"  {key} = {default}\n      {doc}")
        return 0
    recipe = args[0] if args and "=" not in args[0] else None
    overrides = args[1:] if recipe else args
    cfg, path = compose(recipe, overrides)
    from rlcore import dist, runlock
    from rlcore.config import freeze
    from rlcore.validate import validate

    if cfg.trainer.nproc > 1 and dist.world_size() == 1:  # launch the ranks: this same command under torchrun
        validate(cfg, world_size=cfg.trainer.nproc)  # fail here, once, before any process starts
        return _launch(cfg, path, args)
    plan = validate(cfg, world_size=dist.world_size())  # before any model loads
    freeze(cfg)
    dist.init(plan.device)
    run = interrupts.RunState(args=args, total_steps=cfg.trainer.total_steps)
    try:
        with interrupts.second_interrupt_exits():
            code = _train(cfg, path, plan, run)
    except KeyboardInterrupt:
        dist.shutdown(clean=False)
        return interrupts.EXIT_CODE
    except BaseException:
        dist.shutdown(clean=False)  # the other ranks may be inside a collective: no barrier
        raise
    finally:
        if run.run_dir is not None:  # a long-lived caller (a notebook) must not keep the folder locked
            runlock.release(run.run_dir)
    dist.shutdown()
    return code


def _launch(cfg, path: Path, args: list[str]) -> int:
    """trainer.nproc=N: lock the run folder here (the ranks inherit the lock through torchrun) and
    start the ranks, naming the folder for them when the config does not."""
    from rlcore import dist, runlock

    run_dir = Path(cfg.trainer.output_dir or _default_run_dir(path))
    fd = runlock.acquire(run_dir)
    if not cfg.trainer.output_dir:
        args = [*args, f"trainer.output_dir={run_dir}"]
    run = interrupts.RunState(args=args, total_steps=cfg.trainer.total_steps, run_dir=run_dir)
    try:
        with interrupts.second_interrupt_exits():
            return dist.launch(cfg.trainer.nproc, ["train", *args], env=runlock.env_for_children(run_dir),
                               pass_fds=(fd,))
    except KeyboardInterrupt:  # the ranks have stopped: say where, once
        print(interrupts.stopped_line(run), file=sys.stderr)
        return interrupts.EXIT_CODE
    finally:
        runlock.release(run_dir)


def _default_run_dir(path: Path) -> str:
    return f"runs/{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _train(cfg, path: Path, plan, run) -> int:
    from rlcore import dist

    # One run folder for all ranks: rank 0 names it (the default carries the time).
    run_dir = Path(cfg.trainer.output_dir or dist.broadcast_object(_default_run_dir(path)))
    run.run_dir = run_dir
    _lock(run_dir)  # before anything in the folder is read or written
    resume_from = _resume_point(cfg.trainer.resume, run_dir)
    if resume_from is None and (run_dir / "hf").exists():
        raise ConfigError(f"{run_dir} already holds a finished run (hf/); set trainer.output_dir to a new folder")
    if resume_from is not None and (run_dir / "hf").exists():
        print(f"{run_dir} is already finished (export in {run_dir / 'hf'}); nothing to do", file=sys.stderr)
        return 0
    main = dist.is_main()
    if main:
        _write_config(run_dir, to_yaml(cfg))
    dist.barrier()

    from rlcore.export import export_hf
    from rlcore.metrics import Tracker
    from rlcore.trainer import Trainer, write_summary

    started = time.perf_counter()
    trainer, clean = None, False
    try:
        trainer = run.trainer = Trainer(cfg, plan, run_dir)
        if resume_from is not None:
            trainer.resume(resume_from)
            print(f"resumed from {resume_from} (step {trainer.step})", file=sys.stderr)
        if main:
            _print_start(cfg, plan, trainer, run_dir)
        tracker = Tracker(run_dir, total_steps=cfg.trainer.total_steps, start_step=trainer.step, enabled=main)
        try:
            summary = trainer.fit(tracker)
        finally:
            tracker.close()
        if cfg.trainer.export:
            diff = export_hf(trainer.actor.model, trainer.tokenizer, run_dir / "hf", lora_export=cfg.model.lora.export,
                             probe_texts=trainer.probe_texts(), trust_remote_code=cfg.model.trust_remote_code)
            summary |= {"export": str(run_dir / "hf"), "export_max_logit_diff": diff}
        clean = True
    except KeyboardInterrupt:
        if main and not interrupts.launched_by_rlcore():  # with trainer.nproc the launcher says it
            print(interrupts.stopped_line(run), file=sys.stderr, flush=True)
        raise
    finally:
        if trainer is not None:
            trainer.close(clean=clean)
    summary["total_seconds"] = time.perf_counter() - started
    if main:
        write_summary(run_dir, summary)
        _print_summary(summary, run_dir)
    return 0


def _print_start(cfg, plan, trainer, run_dir: Path) -> None:
    params = sum(p.numel() for p in trainer.actor.model.parameters())
    ranks = f" x {plan.world_size} ranks ({cfg.trainer.sharding})" if plan.world_size > 1 else ""
    p = trainer.train_prompts
    unencodable = f", {p.num_unencodable} with characters the tokenizer cannot encode" if p.num_unencodable else ""
    r = cfg.rollout
    tools = f" | tools {', '.join(s.exposed for s in trainer.tools.specs)} ({r.tool_format}, up to {r.max_turns} " \
            "turns)" if trainer.tools is not None else ""
    print(f"run folder {run_dir} | {params / 1e6:.2f}M parameters on {plan.device}{ranks} | "
          f"{len(p)} prompts ({p.num_dropped} dropped as too long{unencodable}) | "
          f"engine {trainer.engine_name} ({trainer.engine_reason}){tools}", file=sys.stderr)
    for prompts in (p, trainer.eval_prompts):
        if prompts is not None and prompts.unencodable_note:
            print(f"warning: {prompts.num_unencodable} prompts dropped; {prompts.unencodable_note}", file=sys.stderr)


def _lock(run_dir: Path) -> None:
    """Rank 0 locks the run folder (unless the launcher holds it); every rank raises alike if taken."""
    from rlcore import dist, runlock

    error = None
    if dist.is_main():
        try:
            runlock.acquire(run_dir)
        except runlock.RunFolderBusy as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error is not None:
        raise runlock.RunFolderBusy(error)


def plan(args: list[str]) -> int:
    """Print the pre-flight memory plan of a recipe (rlcore.plan): per rank and phase, and whether it
    fits --device-gb, with the key to turn first when it does not."""
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    device_gb, rest = None, []
    for i, a in enumerate(args):
        if a == "--device-gb" or a.startswith("--device-gb="):
            value = a.partition("=")[2] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
            device_gb = _gib(value)
        elif not (i > 0 and args[i - 1] == "--device-gb"):
            rest.append(a)
    args = rest
    recipe = args[0] if args and "=" not in args[0] else None
    cfg, _ = compose(recipe, args[1:] if recipe else args)
    from rlcore.plan import estimate

    memory = estimate(cfg)
    print(memory.render(None if device_gb is None else int(device_gb * 2**30)))
    return 0


def _gib(value: str) -> float:
    try:
        gib = float(value)
    except ValueError:
        gib = 0.0
    if not gib > 0:
        raise ConfigError(f"--device-gb needs a positive number of GiB, e.g. --device-gb 80 (got {value!r})")
    return gib


def _resume_point(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: with auto the newest that verifies (saying which newer ones were
    skipped and why), a named one only if it verifies. Every rank calls it (the files are checked in
    shares)."""
    from rlcore import dist
    from rlcore.checkpoint import checkpoint_dirs, newest_verified
    from rlcore.manifest import DamagedCheckpoint, verify

    existing = checkpoint_dirs(run_dir)
    if resume == "never":
        if existing:
            raise ConfigError(f"{run_dir} already holds checkpoints; set trainer.resume=auto to continue it, "
                              "or trainer.output_dir to a new folder")
        return None
    if resume != "auto":
        if not verify(Path(resume)) and dist.is_main():
            print(f"warning: {resume} has no manifest (written before rlcore verified checkpoints); loading it "
                  "unverified", file=sys.stderr)
        return Path(resume)
    found, notes = newest_verified(run_dir)
    if dist.is_main():
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
    if found is None and existing:
        raise DamagedCheckpoint(f"no checkpoint in {run_dir / 'checkpoints'} verifies ({'; '.join(notes)}); move "
                                "them away to start over, or set trainer.output_dir to a new folder")
    return found


def _write_config(run_dir: Path, text: str) -> None:
    """Save the resolved config; a resumed run with a changed config keeps both versions."""
    path = run_dir / "config.yaml"
    if path.exists() and path.read_text() != text:
        path = run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml"
    path.write_text(text)


def _print_summary(summary: dict, run_dir: Path) -> None:
    lines = [f"done in {summary['total_seconds']:.0f}s ({summary['steps']} RL steps)"]
    if "eval_after" in summary:
        before, after = summary["eval_before"]["accuracy"], summary["eval_after"]["accuracy"]
        lines.append(f"held-out accuracy: {before:.3f} before RL -> {after:.3f} after "
                     f"({100 * (after - before):+.1f} points)")
    if "export" in summary:
        lines.append(f"Hugging Face export: {summary['export']}")
    lines.append(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    print("\n".join(lines))


def ls() -> int:
    from algos import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
    from rewards import REWARDS
    from rewards.model_terms import MODEL_REWARDS
    from rlcore.tasks import TASKS
    from rlcore.tools import TOOLS
    from rollout import ENGINES

    print(f"recipes ({recipes_dir()}):")
    for name in builtin_recipes():
        first = (recipes_dir() / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"  {name:<28} {first}")
    for title, table in [("advantage estimators (algo.estimator)", ADVANTAGES),
                         ("policy losses (algo.policy_loss.name)", POLICY_LOSSES),
                         ("loss aggregations (algo.aggregation)", AGGREGATIONS),
                         ("KL estimators (algo.kl.estimator)", KL_ESTIMATORS),
                         ("rewards (reward.terms[i].name; also python:path/file.py:fn)", [*REWARDS, *MODEL_REWARDS]),
                         ("rollout engines (rollout.engine)", ENGINES),
                         ("tools (rollout.tools[i].name; also python:path/file.py:fn)", TOOLS),
                         ("synthetic tasks (data.task.name)", TASKS)]:
        print(f"{title}:\n  " + ", ".join(sorted(table)))
    return 0


def export(args: list[str]) -> int:
    if len(args) != 2:
        print("usage: rlcore export RUN_OR_CHECKPOINT OUT", file=sys.stderr)
        return 2
    from rlcore.checkpoint import checkpoint_dirs, load_checkpoint_model, newest_verified
    from rlcore.export import export_hf
    from rlcore.manifest import MANIFEST, DamagedCheckpoint
    from rlcore.models import load_tokenizer

    source, out = Path(args[0]), Path(args[1])
    is_checkpoint = any((source / name).exists() for name in ("dcp", "state.json", MANIFEST))
    if not is_checkpoint:  # a run folder: its newest checkpoint that verifies
        found, notes = newest_verified(source)
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
        if found is None and checkpoint_dirs(source):
            raise DamagedCheckpoint(f"no checkpoint of {source} verifies: {'; '.join(notes)}")
        if found is None:
            raise FileNotFoundError(f"{source} is neither a checkpoint folder nor a run folder with checkpoints")
        source = found
    model = load_checkpoint_model(source)  # verifies it: a damaged file is named
    tokenizer = load_tokenizer(str(source / "model"), trust_remote_code=False)
    probe_texts = json.loads((source / "state.json").read_text()).get("probe_texts", [])
    diff = export_hf(model, tokenizer, out, probe_texts=probe_texts)
    print(json.dumps({"checkpoint": str(source), "export": str(out), "max_logit_diff": diff}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
