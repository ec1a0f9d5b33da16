"""`rlcore train | ls | export`: the command line.

    rlcore train [RECIPE|PATH] [key=value ...]   no recipe: the quickstart
    rlcore plan [RECIPE|PATH] [key=value ...] [--device-gb N]
                                                 memory per rank and phase, before anything loads
    rlcore ls                                    recipes, algorithms, rewards, engines, tasks
    rlcore export RUN_OR_CHECKPOINT OUT          a Hugging Face folder, checked by reloading
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rlcore.data import DataError
from rlcore.recipe import ConfigError, builtin_recipes, compose, field_docs, recipes_dir, to_yaml

USER_ERRORS = (ConfigError, DataError, FileNotFoundError, FileExistsError)


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
    from rlcore import dist
    from rlcore.config import freeze
    from rlcore.validate import validate

    if cfg.trainer.nproc > 1 and dist.world_size() == 1:  # launch the ranks: this same command under torchrun
        validate(cfg, world_size=cfg.trainer.nproc)  # fail here, once, before any process starts
        return dist.launch(cfg.trainer.nproc, ["train", *args])
    plan = validate(cfg, world_size=dist.world_size())  # before any model loads
    freeze(cfg)
    dist.init(plan.device)
    try:
        code = _train(cfg, path, plan)
    except BaseException:
        dist.shutdown(clean=False)  # the other ranks may be inside a collective: no barrier
        raise
    dist.shutdown()
    return code


def _train(cfg, path: Path, plan) -> int:
    from rlcore import dist

    # One run folder for all ranks: rank 0 names it (the default carries the time).
    default = f"runs/{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.trainer.output_dir or dist.broadcast_object(default))
    resume_from = _resume_point(cfg.trainer.resume, run_dir)
    if resume_from is None and (run_dir / "hf").exists():
        raise ConfigError(f"{run_dir} already holds a finished run (hf/); set trainer.output_dir to a new folder")
    if resume_from is not None and (run_dir / "hf").exists():
        print(f"{run_dir} is already finished (export in {run_dir / 'hf'}); nothing to do", file=sys.stderr)
        return 0
    main = dist.is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(run_dir, to_yaml(cfg))
    dist.barrier()

    from rlcore.checkpoint import export_hf
    from rlcore.metrics import Tracker
    from rlcore.trainer import Trainer, write_summary

    started = time.perf_counter()
    trainer = Trainer(cfg, plan, run_dir)
    clean = False
    try:
        if resume_from is not None:
            trainer.resume(resume_from)
            print(f"resumed from {resume_from} (step {trainer.step})", file=sys.stderr)
        if main:
            params = sum(p.numel() for p in trainer.actor.model.parameters())
            ranks = f" x {plan.world_size} ranks ({cfg.trainer.sharding})" if plan.world_size > 1 else ""
            print(f"run folder {run_dir} | {params / 1e6:.2f}M parameters on {plan.device}{ranks} | "
                  f"{len(trainer.train_prompts)} prompts ({trainer.train_prompts.num_dropped} dropped as too long)",
                  file=sys.stderr)
        tracker = Tracker(run_dir, total_steps=cfg.trainer.total_steps, start_step=trainer.step, enabled=main)
        try:
            summary = trainer.fit(tracker)
        finally:
            tracker.close()
        if cfg.trainer.export:
            diff = export_hf(trainer.actor.model, trainer.tokenizer, run_dir / "hf", lora_export=cfg.model.lora.export)
            summary |= {"export": str(run_dir / "hf"), "export_max_logit_diff": diff}
        clean = True
    finally:
        trainer.close(clean=clean)
    summary["total_seconds"] = time.perf_counter() - started
    if main:
        write_summary(run_dir, summary)
        _print_summary(summary, run_dir)
    return 0


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
    from rlcore.checkpoint import checkpoint_dirs

    existing = checkpoint_dirs(run_dir)
    if resume == "auto":
        return existing[-1] if existing else None
    if resume == "never":
        if existing:
            raise ConfigError(f"{run_dir} already holds checkpoints; set trainer.resume=auto to continue it, "
                              "or trainer.output_dir to a new folder")
        return None
    return Path(resume)


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
                         ("synthetic tasks (data.task.name)", TASKS)]:
        print(f"{title}:\n  " + ", ".join(sorted(table)))
    return 0


def export(args: list[str]) -> int:
    if len(args) != 2:
        print("usage: rlcore export RUN_OR_CHECKPOINT OUT", file=sys.stderr)
        return 2
    from rlcore.checkpoint import checkpoint_dirs, export_hf, load_checkpoint_model
    from rlcore.models import load_tokenizer

    source, out = Path(args[0]), Path(args[1])
    if not (source / "dcp").is_dir():
        found = checkpoint_dirs(source)
        if not found:
            raise FileNotFoundError(f"{source} is neither a checkpoint folder nor a run folder with checkpoints")
        source = found[-1]
    model = load_checkpoint_model(source)
    tokenizer = load_tokenizer(str(source / "model"), trust_remote_code=False)
    diff = export_hf(model, tokenizer, out)
    print(json.dumps({"checkpoint": str(source), "export": str(out), "max_logit_diff": diff}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
