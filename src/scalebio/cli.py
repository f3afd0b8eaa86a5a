"""`scalebio <command>`: the command-line entry point."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from .config import ConfigError, RunConfig, describe, load_config

log = logging.getLogger("scalebio")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _reweight(args: argparse.Namespace) -> int:
    from .reweight import run_reweight

    cfg = load_config(args.config, args.overrides, RunConfig)
    record = run_reweight(cfg, stop_after=args.stop_after, progress=not args.no_progress)
    if record is not None:
        top = sorted(record["weights"].items(), key=lambda kv: -kv[1])
        log.info("weights written to %s/weights.json: %s", cfg.run_dir, ", ".join(f"{k}={v:.4f}" for k, v in top))
    return 0


def _resample(args: argparse.Namespace) -> int:
    from .resample import pool_from_run, resample

    pool = pool_from_run(args.run_dir)
    weights = None if args.uniform else (args.weights or f"{args.run_dir}/weights.json")
    manifest = resample(weights, pool, args.n, args.seed, args.out, replace=args.replace)
    log.info("wrote %d examples to %s: %s", args.n, args.out, manifest["counts"])
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .finetune import FinetuneConfig, finetune

    cfg = load_config(args.config, args.overrides, FinetuneConfig)
    folder = finetune(cfg, progress=not args.no_progress)
    log.info("model saved to %s", folder)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .evaluation import evaluate, load_model, load_task_yaml

    tasks = []
    for task in args.tasks:
        if task.endswith((".yaml", ".yml")):
            tasks.append(load_task_yaml(task, args.data_file))
        else:
            tasks.append(task)  # a built-in lm-eval task (downloads its data)
    import torch

    from . import precision

    model, tokenizer = load_model(args.model, args.gguf_file, args.device)
    device = next(model.parameters()).device
    compute_dtype = precision.resolve(args.precision, device)
    log.info("evaluating with %s compute", "bf16 (autocast)" if compute_dtype == torch.bfloat16 else "fp32")
    with precision.autocast(compute_dtype, device):
        result = evaluate(model, tokenizer, tasks, Path(args.out), limit=args.limit, batch_size=args.batch_size,
                          max_length=args.max_length)  # the in-memory model stays on load_model's device
    log.info("wrote %s: %s", args.out, result.get("tasks"))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export, parse_pairs, load_mixture, write_export

    names = load_mixture(args.run_dir).names
    sizes = {}
    for name, value in parse_pairs(args.sizes, names, "--sizes").items():
        if not value.isdigit():
            raise ValueError(f"--sizes: {name}={value!r} is not a whole number of examples")
        sizes[name] = int(value)
    command = "scalebio export " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["export"] else None
    outputs = export(args.run_dir, args.to, parse_pairs(args.paths, names, "--paths"), basis=args.basis,
                     stopping=args.stopping, total=args.total, sizes=sizes, seed=args.seed, command=command)
    written = write_export(outputs, args.out)
    if written:
        log.info("wrote %s", ", ".join(str(p) for p in written))
    else:
        sys.stdout.write(outputs[""])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalebio", description="ScaleBiO: learn data-source weights by first-order bilevel optimisation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (shows every LISA switch)")
    sub = parser.add_subparsers(dest="command", required=True)

    rw = sub.add_parser(
        "reweight",
        help="learn source weights (writes a run directory with weights.json)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run ScaleBiO on the sources a config names. Options and key=value overrides may come in any "
                    "order.\n\nResumes from the newest checkpoint in run_dir when started again with the same command; "
                    "a resume whose data files changed\n(sha256) is refused, naming the file and both digests. "
                    "resume=false starts over: the old run's checkpoints, logs and\ntokenizer are removed first. "
                    "SIGTERM, SIGINT or SIGUSR1 end the run after the current step with a checkpoint (exit status 128 + "
                    "the signal);\nthe same command resumes. A run_dir in use by another process (run_dir/run.lock) is "
                    "refused.\n"
                    "solver.steps: null = one epoch over the pooled training data, else an integer >= 1.\n"
                    "Learning rates must be > 0, weight decays >= 0. A non-finite loss, λ or parameter stops the run "
                    "(meta.json: failed);\nnothing non-finite is written.",
        epilog="config fields (set in the YAML or as key=value overrides, e.g. solver.alpha=100):\n" + "\n".join(describe(RunConfig)),
    )
    rw.add_argument("config", help="YAML run config")
    rw.add_argument("overrides", nargs="*", help="dotted key=value overrides, values parsed as YAML")
    rw.add_argument("--stop-after", type=int, default=None, help="stop after this many completed steps (the run can be resumed)")
    rw.add_argument("--no-progress", action="store_true", help="no progress bar")
    rw.set_defaults(func=_reweight)

    rs = sub.add_parser("resample", help="draw N examples from a reweighting run's sources by its learned weights (or uniformly)",
                        description="Sources and decontamination come from RUN_DIR/config.yaml (its data paths "
                                    "resolve against the run's config file, from any directory); the weights must "
                                    "name exactly the pool's sources. The output JSONL gets a 'source' field per "
                                    "record and a .manifest.json naming the weights file; both are written "
                                    "atomically.")
    rs.add_argument("run_dir", help="a `scalebio reweight` run directory")
    rs.add_argument("--n", type=int, required=True, help="how many examples to draw (>= 1; at most the pool's size "
                                                          "unless --replace)")
    rs.add_argument("--replace", action="store_true", help="allow --n larger than the pool: records then repeat (the "
                                                          "manifest counts the repeats per source)")
    rs.add_argument("--seed", type=int, default=0, help="draws are a pure function of the seed")
    rs.add_argument("--out", required=True, help="output JSONL")
    rs.add_argument("--weights", default=None, help="weights file (default RUN_DIR/weights.json)")
    rs.add_argument("--uniform", action="store_true", help="uniform weights over the same sources (the baseline)")
    rs.set_defaults(func=_resample)

    from .config import describe as _describe
    from .finetune import FinetuneConfig

    ft = sub.add_parser("finetune", help="supervised fine-tuning (full or LISA) on one data file",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="config fields:\n" + "\n".join(_describe(FinetuneConfig)))
    ft.add_argument("config", help="YAML fine-tuning config")
    ft.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    ft.add_argument("--no-progress", action="store_true")
    ft.set_defaults(func=_finetune)

    ev = sub.add_parser("evaluate", help="lm-eval on one model: task YAMLs (e.g. experiments/*/lm_eval/) or built-in tasks",
                        description="Writes OUT (compact eval.json: {tasks: {task: {metric: value}}}) and OUT's .full.json.")
    ev.add_argument("model", help="a model directory (e.g. a finetune run's model/) or hub id")
    ev.add_argument("--tasks", nargs="+", required=True, help="task YAML paths and/or built-in lm-eval task names")
    ev.add_argument("--out", required=True, help="eval.json to write")
    ev.add_argument("--data-file", default=None, help="replace the test file of the task YAMLs")
    ev.add_argument("--max-length", type=int, default=None, help="scoring window in tokens (default the model's)")
    ev.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    ev.add_argument("--gguf-file", default=None, help="a GGUF file inside MODEL")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ev.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="compute precision (autocast bf16 on a bf16-capable GPU or CPU under auto)")
    ev.set_defaults(func=_evaluate)

    from .export import FORMATS, STOPPING, help_epilog

    ex = sub.add_parser("export", help="a run's weights in another trainer's mixture syntax (hf, megatron, axolotl, ...)",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=help_epilog(),
                        description="Print (or write to --out) RUN_DIR/weights.json as FORMAT's mixture config, with "
                                    "comments stating what each number means and how it was converted.")
    ex.add_argument("run_dir", help="a `scalebio reweight` run directory (or a weights.json)")
    ex.add_argument("--to", required=True, choices=list(FORMATS), help="target trainer format (listed below)")
    ex.add_argument("--paths", nargs="+", metavar="NAME=PATH", help="the path (or dataset name, Megatron prefix) "
                    "of each source in the trainer; without it the source names stand in")
    ex.add_argument("--out", default=None, help="file to write (default: print); megatron also writes "
                    "OUT-stem.data_args.txt for --data-args-path")
    ex.add_argument("--basis", choices=["examples", "tokens"], default=None,
                    help="unit of a mixture: probability of the next example or share of tokens (default: the "
                         "format's, listed below; needs weights.json's source_stats for tokens)")
    ex.add_argument("--stopping", choices=list(STOPPING), default="first_exhausted",
                    help="hf stopping_strategy / llamafactory mix_strategy (interleave_under / interleave_over)")
    ex.add_argument("--total", type=int, default=None, help="open-instruct: examples in all (gives counts); "
                    "olmo: requested tokens (sizes max_repetition_ratio)")
    ex.add_argument("--sizes", nargs="+", metavar="NAME=N", help="axolotl / open-instruct: examples in each "
                    "dataset the trainer loads (default: the run's kept examples)")
    ex.add_argument("--seed", type=int, default=0, help="seed written into formats that take one")
    ex.set_defaults(func=_export)
    return parser


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Options and ``key=value`` overrides in any order: argparse stops filling a ``nargs="*"`` positional at
    the first option, so overrides after an option come back unrecognized; they are appended in order."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if not (hasattr(args, "overrides") and _is_override(a))]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    from .distributed import rank_and_world
    from .results import RunInterrupted

    parser = build_parser()
    args = parse_args(parser, argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except RunInterrupted as e:
        # One line (rank 0's) that says how to resume; the exit status is 128 + the signal's number.
        if rank_and_world()[0] == 0:
            log.error("%s", e.resume_line("scalebio " + shlex.join(sys.argv[1:] if argv is None else argv)))
        return e.exit_code
    except (ConfigError, ValueError, OSError, RuntimeError) as e:
        if args.verbose:
            raise
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
