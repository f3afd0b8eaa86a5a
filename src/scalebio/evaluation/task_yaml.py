"""Task YAMLs: ``write_task_yaml`` saves a task dict for ``lm_eval --include_path``, ``load_task_yaml`` reads one
back as lm-eval does."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import yaml

from ..files import write_text

YAML_HELPER_MODULE = "scalebio_lm_eval"
"""The Python file that ``write_task_yaml`` puts beside a YAML; its ``!function`` hooks import from here."""


class _Function(str):
    """A hook written as ``!function scalebio_lm_eval.<name>``."""


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v)))


class _TaskLoader(yaml.SafeLoader):
    """Reads our task YAMLs without importing their hooks (for the task name)."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _to_yaml_value(value):
    if callable(value):
        from scalebio import evaluation  # the hooks a YAML names are the package's (`from scalebio.evaluation import`)

        if getattr(evaluation, getattr(value, "__name__", ""), None) is not value:
            raise ValueError(f"write_task_yaml: cannot write the callable {value!r} (only scalebio.evaluation hooks)")
        return _Function(f"{YAML_HELPER_MODULE}.{value.__name__}")
    if isinstance(value, dict):
        return {k: _to_yaml_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_yaml_value(v) for v in value]
    return value


def write_task_yaml(task: dict, path: Path) -> None:
    """Save ``task`` as ``path`` for ``lm_eval --include_path <folder> --tasks <name>``.

    Beside it go the rendered documents (``<stem>.jsonl``, referenced by absolute path because lm-eval resolves
    relative ``data_files`` against the working directory) and ``scalebio_lm_eval.py``, which re-exports the
    metric hooks named with ``!function`` (lm-eval imports it from the YAML's folder; scalebio must be
    installed where lm_eval runs).
    """
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    task = copy.deepcopy(task)
    source = Path(task["dataset_kwargs"]["data_files"]["test"])
    data_copy = path.with_suffix(".jsonl")
    if source.resolve() != data_copy:
        shutil.copyfile(source, data_copy)
    task["dataset_kwargs"]["data_files"]["test"] = str(data_copy)
    header = (f"# lm_eval --model hf --model_args pretrained=MODEL_DIR,dtype=float32 "
              f"--include_path {path.parent} --tasks {task['task']}\n"
              f"# Written by scalebio.evaluation.write_task_yaml; scalebio.evaluation's docstring defines the metrics.\n")
    write_text(path, header + yaml.dump(_to_yaml_value(task), Dumper=_TaskDumper, sort_keys=False,
                                           allow_unicode=True))
    hooks = sorted({v.split(".", 1)[1] for v in _functions_in(_to_yaml_value(task))})
    helper = path.parent / f"{YAML_HELPER_MODULE}.py"
    existing = set(re.findall(r"^from scalebio\.evaluation import (\w+)", helper.read_text(), re.M)) \
        if helper.is_file() else set()
    names = sorted(existing | set(hooks))
    write_text(helper, '"""lm-eval !function hooks of the task YAMLs in this folder (written by '
                          'scalebio.evaluation.write_task_yaml)."""\n'
                  + "".join(f"from scalebio.evaluation import {n}  # noqa: F401\n" for n in names))


def _functions_in(value) -> list[str]:
    if isinstance(value, _Function):
        return [str(value)]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _functions_in(v)]
    if isinstance(value, list):
        return [f for v in value for f in _functions_in(v)]
    return []


def load_task_yaml(path: str | Path, data_file: str | Path | None = None) -> dict:
    """A task YAML as lm-eval reads it (``include`` merged, ``!function`` hooks imported), as a task dict;
    ``data_file`` replaces its test file (the YAMLs name files relative to the repository root)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task YAML {path} not found")
    task = load_yaml(path)
    if "task" not in task:
        raise ValueError(f"{path}: not an lm-eval task YAML (no 'task' key)")
    if data_file is not None:
        data_file = Path(data_file).resolve()
        if not data_file.is_file():
            raise FileNotFoundError(f"{path}: test file {data_file} not found")
        task.setdefault("dataset_kwargs", {})["data_files"] = {task.get("test_split", "test"): str(data_file)}
    return task


def _yaml_task_name(path: Path) -> str:
    cfg = yaml.load(Path(path).read_text(), Loader=_TaskLoader)
    if not isinstance(cfg, dict) or "task" not in cfg:
        raise ValueError(f"{path}: not an lm-eval task YAML (no 'task' key)")
    return cfg["task"]
