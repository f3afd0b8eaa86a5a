"""Running lm-eval: ``evaluate`` builds the model wrapper and the task manager, calls ``lm_eval.simple_evaluate``
and writes the record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .models import _make_lm
from .record import write_record, write_samples
from .task_yaml import _yaml_task_name


def _task_manager(tasks: list[dict | str | Path]):
    """Built-in tasks are indexed only when a task is given by name (that costs seconds and needs a network
    to run them); YAML paths are found through include_path."""
    from lm_eval.tasks import TaskManager

    specs: list[Any] = []
    include: list[str] = []
    by_name = False
    for t in tasks:
        if isinstance(t, dict):
            specs.append(t)
        elif isinstance(t, Path) or (isinstance(t, str) and t.endswith((".yaml", ".yml"))):
            path = Path(t).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"task YAML {path} not found")
            include.append(str(path.parent))
            specs.append(_yaml_task_name(path))
        else:
            by_name = True
            specs.append(t)
    include = sorted(set(include))
    manager = TaskManager(include_path=include or None, include_defaults=by_name)
    return manager, specs


def evaluate(model_dir_or_model, tokenizer, tasks: list[dict | str | Path], out: Path, limit: int | None = None,
             batch_size: int = 8, device: str = "cpu", bootstrap_iters: int = 1000,
             max_length: int | None = None, samples_out: Path | None = None) -> dict:
    """Run ``lm_eval.simple_evaluate`` and write ``out`` (compact eval.json) and ``out.with_suffix(".full.json")``
    (lm-eval's results without per-sample logs). Returns the compact dict.

    ``model_dir_or_model``: a local model directory, an in-memory ``PreTrainedModel`` (with ``tokenizer``), or
    an ``lm_eval`` ``LM`` object. ``tasks``: task dicts from ``scalebio.evaluation.tasks``, task YAML paths, or built-in task
    names (mmlu, arc_challenge, hellaswag, truthfulqa_mc2, gsm8k; they download their data). ``limit``: at
    most this many documents per task. ``bootstrap_iters`` only matters for built-in metrics lm-eval
    bootstraps; the weighted metrics of our tasks have no stderr. ``max_length``: the model's context window for
    scoring (lm-eval's HFLM ``max_length``; default the model's own), e.g. the length a small model was trained at.
    ``samples_out``: also write the per-document values there (``eval_samples.jsonl``, format in
    ``scalebio.evaluation.record``), from lm-eval's ``log_samples``; eval.json is the same either way.
    """
    import lm_eval

    if not tasks:
        raise ValueError("evaluate: no tasks")
    lm, model_name = _make_lm(model_dir_or_model, tokenizer, batch_size, device, max_length)
    manager, specs = _task_manager(list(tasks))
    results = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit,
                                      log_samples=samples_out is not None, bootstrap_iters=bootstrap_iters)
    if results is None:  # not rank 0
        return {}
    samples = results.pop("samples", None)
    if samples_out is not None:
        write_samples(samples, Path(samples_out))
    return write_record(results, Path(out), model_name, limit, lm_eval.__version__)
