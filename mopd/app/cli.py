"""The ``mopd`` command line.

    mopd validate RECIPE [LAYER.yaml ...] [key=value ...] [--resume]   the checks `train` runs before Ray
    mopd check RECIPE [key=value ...] [--models] [--vllm]     the teachers against the student, before any actor
    mopd plan RECIPE [key=value ...] [--gpus N] [--nodes M]   memory per actor, and whether it fits
    mopd train RECIPE [LAYER.yaml ...] [key=value ...] [--resume]
    mopd export CHECKPOINT OUT_DIR           a Hugging Face directory of the trained student (--adapter: LoRA only)
    mopd eval RECIPE --student DIR|CHECKPOINT [--samples K] [key=value ...]   greedy and sampled accuracy
    mopd quickstart [--output-dir DIR] [--from-stage STAGE] [key=value ...]

RECIPE is a YAML file, or the name of a recipe shipped with mopd (``mopd validate quickstart``:
the checkout's recipes/quickstart.yaml, also from an installed wheel; see mopd/app/shipped.py).

``mopd COMMAND --help`` lists a command's options. An error a user can cause (recipe, data,
checkpoint, teacher set, vocabulary: ``mopd.config.ConfigError``) is one ``mopd: error:`` line,
exit status 2, before any actor starts; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from mopd.app.shipped import resolve_recipe
from mopd.config import ConfigError, load_config, to_yaml

RECIPE_HELP = "a recipe YAML file, or the name of a recipe shipped with mopd (e.g. quickstart, tiny)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mopd", description="Multi-Teacher On-Policy Distillation")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="run every check `train` runs before Ray; print the resolved recipe")
    v.add_argument("recipe", help=RECIPE_HELP)
    v.add_argument("overrides", nargs="*", metavar="key=value", help="key=value overrides or extra YAML layers")
    _resume_options(v)
    c = sub.add_parser("check", help="check every teacher against the student (tokenizers, ids; --models: scores)")
    c.add_argument("recipe", help=RECIPE_HELP)
    c.add_argument("overrides", nargs="*", metavar="key=value", help="key=value overrides or extra YAML layers")
    c.add_argument(
        "--models",
        action="store_true",
        help="load the student and each teacher (no Ray): initial reverse KL per domain, replicas agree",
    )
    c.add_argument("--prompts", type=int, default=4, help="prompts per domain for --models (default 4)")
    c.add_argument("--vllm", action="store_true", help="with --models: compare each hf teacher with vLLM too")
    pl = sub.add_parser("plan", help="the memory each actor needs and the GPUs it asks for (no weights loaded)")
    pl.add_argument("recipe", help=RECIPE_HELP)
    pl.add_argument("overrides", nargs="*", metavar="key=value", help="key=value overrides or extra YAML layers")
    pl.add_argument("--gpus", type=float, default=None, help="GPUs per node of the cluster to plan for")
    pl.add_argument("--nodes", type=int, default=1, help="nodes of --gpus GPUs each (default 1)")
    pl.add_argument("--gpu-memory-gb", type=float, default=None, help="memory of one GPU (placement.gpu_memory_gb)")
    pl.add_argument(
        "--ray-address",
        default=None,
        help="read the GPUs from this Ray cluster (default: ray.address, else RAY_ADDRESS)",
    )
    t = sub.add_parser("train", help="run the MOPD loop on Ray")
    t.add_argument("recipe", help=RECIPE_HELP)
    t.add_argument("overrides", nargs="*", metavar="key=value", help="key=value overrides or extra YAML layers")
    _resume_options(t)
    e = sub.add_parser("export", help="write a Hugging Face directory from a checkpoint")
    e.add_argument("checkpoint", help="a checkpoint directory (or a run's checkpoints/ to take the latest)")
    e.add_argument("out_dir")
    e.add_argument("--adapter", action="store_true", help="a LoRA student's adapter alone (PEFT), not the merged model")
    ev = sub.add_parser("eval", help="a student's greedy (and sampled) accuracy on the recipe's held-out prompts")
    ev.add_argument("recipe", help=RECIPE_HELP)
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="key=value overrides or extra YAML layers")
    ev.add_argument(
        "--student",
        required=True,
        help="a Hugging Face directory (e.g. from mopd export), a checkpoint, or a run's checkpoints/ (the latest)",
    )
    ev.add_argument("--samples", type=int, default=0, help="sampled responses per prompt: mean@K and pass@K")
    ev.add_argument("--prompts", type=int, default=None, help="held-out prompts per source (default eval.num_prompts)")
    ev.add_argument("--output", default="eval.json", help="where to write the figures as JSON (default eval.json)")
    q = sub.add_parser("quickstart", help="SFT student, derived teachers, MOPD and a report, on the CPU")
    q.add_argument("--output-dir", default="runs/quickstart")
    q.add_argument("--from-stage", default=None, help="re-run this stage and the ones after it")
    q.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="quickstart settings (e.g. teacher_sft_steps=300) or recipe keys",
    )
    return p


def _resume_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument(
        "--force-teachers", action="store_true", help="resume even if the teacher set differs from the checkpoint's"
    )


def _validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    from mopd.app.run import preflight

    pre = preflight(cfg, resume=args.resume, force_teachers=args.force_teachers)
    for warning in pre.warnings:
        print(f"mopd: warning: {warning}", file=sys.stderr)
    print(to_yaml(cfg), end="")
    return 0


def configure_logging() -> None:
    """What ``mopd train`` and ``mopd quickstart`` show while they run: INFO and above of every
    logger on stderr, with the time and the logger's name. Only this entry point configures
    logging; the library logs to ``logging.getLogger(__name__)`` and leaves its host's root logger
    alone. (Ray actors log in their own processes; Ray forwards their output to this one.)"""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    configure_logging()
    from mopd.app.run import RunStoppedError, run_training

    try:
        run_training(cfg, resume=args.resume, force_teachers=args.force_teachers)
    except RunStoppedError as e:
        again = ["mopd", "train", args.recipe, *args.overrides, "--resume"]
        again += ["--force-teachers"] if args.force_teachers else []
        print(f"mopd: error: {e}\nto continue: {shlex.join(again)}", file=sys.stderr)
        return 1
    return 0


def _check(args: argparse.Namespace) -> int:
    from mopd.app.check import check_teachers, format_report, model_checks, model_problems, raise_on_model_failure

    cfg = load_config(args.recipe, args.overrides)
    report = check_teachers(cfg)
    # The models load only for teachers that passed the cheap checks: scores of other ids mean nothing.
    models = model_checks(cfg, args.prompts, args.vllm) if args.models and not report.failed else {}
    print(format_report(report, models))
    for warning in report.warnings + model_problems(models, "warn"):
        print(f"mopd: warning: {warning}", file=sys.stderr)
    report.raise_on_failure()
    raise_on_model_failure(models)
    print("all teacher checks pass" + ("" if args.models else " (tokenizers and configs; --models loads the models)"))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from mopd.dist.plan import check_cluster, cluster_gpus, format_plan, plan_recipe, raise_if_unfit

    cfg = load_config(args.recipe, args.overrides)
    plan = plan_recipe(cfg, args.gpu_memory_gb)
    address = args.ray_address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if args.gpus is not None:
        nodes, source = [args.gpus] * args.nodes, f"{args.nodes} node(s) x {args.gpus:g} GPUs (--gpus/--nodes)"
    elif address:
        nodes = cluster_gpus(address)
        source = f"Ray cluster at {address}: {len(nodes)} node(s), {sum(nodes):g} GPUs"
    else:
        nodes, source = [], "not checked (pass --gpus N [--nodes M], --ray-address or set RAY_ADDRESS)"
    if nodes:
        check_cluster(plan, nodes)
    print(format_plan(plan))
    print(f"cluster: {source}")
    raise_if_unfit(plan)
    print("fits")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also follow an option (``mopd plan R --gpus 8 k=v``): argparse leaves them over.
    if extra and hasattr(args, "overrides") and not any(x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if hasattr(args, "recipe"):  # a YAML file, or the name of a shipped recipe (`mopd validate quickstart`)
            args.recipe = resolve_recipe(args.recipe)
        if args.command == "validate":
            return _validate(args)
        if args.command == "check":
            return _check(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "train":
            return _train(args)
        if args.command == "export":
            from mopd.app.export import export_checkpoint

            try:
                path = export_checkpoint(args.checkpoint, args.out_dir, adapter=args.adapter)
            except FileNotFoundError as e:  # a mistyped checkpoint path: the user's to fix, not a bug
                raise ConfigError(f"{e}; pass a checkpoint directory or a run's checkpoints/") from None
            print(f"exported {path}")
            return 0
        if args.command == "eval":
            from mopd.app.evaluate import format_eval, run_eval, write_eval

            configure_logging()
            report = run_eval(load_config(args.recipe, args.overrides), args.student, args.samples, args.prompts)
            print(format_eval(report))
            print(f"wrote {write_eval(report, args.output)}")
            return 0
        if args.command == "quickstart":
            from mopd.app.quickstart import run_quickstart

            configure_logging()
            run_quickstart(args.output_dir, args.from_stage, args.overrides)
            return 0
    except ConfigError as e:  # and its subclasses: DataError, ConfigMismatchError, VocabularyMismatchError
        print(f"mopd: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
