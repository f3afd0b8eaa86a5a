"""The run directory: a self-describing record of one run, and loading runs back.

    run_dir/
      config.yaml      the resolved config
      meta.json        package versions, git revision, seed, hardware, wall time, status
      data.json        per-source counts: records, decontaminated, truncated, kept
      metrics.jsonl    one line per step (validation loss, L2 under u and w, their gap, lrs, α, active blocks)
      weights.jsonl    one line per step: the source weights
      weights.json     final source → weight with provenance (written atomically)
      checkpoints/     step_XXXXXXX.pt, written atomically; the newest is resumed from
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .weights import atomic_write_text

PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "accelerate", "deepspeed", "lm_eval", "numpy", "scalebio")


def package_versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision(start: Path | None = None) -> str | None:
    """The git commit of the checkout containing ``start`` (default: this package), with '+dirty' if modified."""
    where = start or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


class RunDir:
    """Writes one run's files; every whole-file write is atomic, the JSONL logs are appended line by line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"

    # JSONL logs -------------------------------------------------------------------------------------------
    def append(self, name: str, record: dict) -> None:
        with open(self.path / name, "a") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def truncate_logs(self, completed_steps: int) -> None:
        """On resume, drop log lines of steps after the checkpoint (they will be redone identically)."""
        for name in ("metrics.jsonl", "weights.jsonl"):
            path = self.path / name
            if not path.exists():
                continue
            keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < completed_steps]
            atomic_write_text(path, "".join(line + "\n" for line in keep))

    def reset_logs(self) -> None:
        for name in ("metrics.jsonl", "weights.jsonl", "weights.json"):
            (self.path / name).unlink(missing_ok=True)

    # checkpoints ------------------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoints.is_dir():
            return None
        found = sorted(self.checkpoints.glob("step_*.pt"))
        return found[-1] if found else None

    def save_checkpoint(self, step: int, state: dict, keep: int = 1) -> Path:
        """torch.save into a temporary file, then rename: a killed save never leaves a partial checkpoint."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints / f"step_{step:07d}.pt"
        fd, tmp = tempfile.mkstemp(dir=self.checkpoints, prefix=".step_", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        for old in sorted(self.checkpoints.glob("step_*.pt"))[:-keep]:
            old.unlink()
        return final


def relativize(folder: str | Path, root: str | Path) -> None:
    """Rewrite the small result files under ``folder`` (JSON, JSONL, YAML) so that paths under ``root`` are
    relative to it: committed results do not name the machine's absolute paths."""
    prefix = str(Path(root)) + "/"
    for path in Path(folder).rglob("*"):
        if path.suffix in (".json", ".jsonl", ".yaml") and path.is_file():
            text = path.read_text()
            if prefix in text:
                path.write_text(text.replace(prefix, ""))


RUN_FILES = ("config.yaml", "meta.json", "data.json", "metrics.jsonl", "weights.jsonl", "weights.json")
"""The small files of a reweighting run directory, the ones worth committing (no checkpoints, no tokenizer)."""


def copy_run_results(run_dir: str | Path, out: str | Path, root: str | Path) -> None:
    """Copy a reweighting run's RUN_FILES into ``out``, with paths under ``root`` made relative."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        shutil.copy2(Path(run_dir) / name, out / name)
    relativize(out, root)


def copy_retrain_results(work: str | Path, out: str | Path, manifest: dict, root: str | Path) -> None:
    """The committed files of one retrain arm: ``resample.json`` (the resample manifest without the machine's
    weights path; its sha256 stays), ``finetune_metrics.jsonl`` and ``eval.json``, from the arm's ``work``
    folder (``finetune/metrics.jsonl``, ``eval.json``)."""
    work, out = Path(work), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {k: v for k, v in manifest.items() if k != "weights_file"}
    (out / "resample.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.copy2(work / "finetune" / "metrics.jsonl", out / "finetune_metrics.jsonl")
    shutil.copy2(work / "eval.json", out / "eval.json")
    relativize(out, root)


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file; a malformed line raises an error naming the file and the line."""
    from .data import read_records

    return read_records(Path(path))
