"""The run directory: a self-describing record of one run, and loading runs back.

    run_dir/
      config.yaml      the resolved config
      meta.json        package versions, git revision, seed, hardware, wall time, status
      data.json        per-source counts: records, decontaminated, truncated, kept
      metrics.jsonl    one line per step (validation loss, L2 under u and w, their gap, lrs, α, active blocks)
      weights.jsonl    one line per step: the source weights
      weights.json     final source → weight with provenance (written atomically)
      checkpoints/     step_XXXXXXX.pt, written atomically; the newest is resumed from
      tokenizer/       a trained tokenizer (``train_bpe``), saved atomically with the digest of its data

Reliability (README "Reliability"): every whole-file write goes to a temporary file (``.NAME.*.tmp``) that is
renamed over the target, a folder (the tokenizer) to a temporary folder renamed into place; temporaries left
by a kill are removed on the next start. The JSONL logs are appended a line at a time; a last line cut short
by a kill is dropped on resume. ``SCALEBIO_KILL_AT=<point>:<n>`` ends the process at the n-th pass through a
named point (``kill_point``), so tests can kill a run at exact moments.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .weights import atomic_write_text

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------------------
# A testing hook that kills the process at a named point.

KILL_ENV = "SCALEBIO_KILL_AT"
KILL_EXIT_CODE = 137
"""The exit status of a process ended by the hook (that of a ``kill -9``)."""
KILL_POINTS = (
    "tokenizer.tmp_created", "tokenizer.written", "tokenizer.old_moved",
    "checkpoint.tmp_created", "checkpoint.writing", "checkpoint.tmp_written", "checkpoint.replaced",
    "log.mid_line", "log.between", "step.end",
    "write.<file name>",  # every atomic whole-file write (write.meta.json, write.config.yaml, …), before the rename
)
"""The named points (``checkpoint.writing`` is passed once per chunk torch.save writes)."""
_kill_hits: dict[str, int] = {}


def _kill_spec() -> tuple[str, int] | None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    point, sep, count = spec.rpartition(":")
    if not sep or not count.isdigit():
        return spec, 1
    return point, int(count)


def kill_armed(name: str) -> bool:
    spec = _kill_spec()
    return spec is not None and spec[0] == name


def kill_point(name: str) -> None:
    """``SCALEBIO_KILL_AT=<name>:<n>`` ends the process with ``os._exit`` (no cleanup, no flush of open files,
    like ``kill -9``) the n-th time this process passes the point ``name``. Unset, it does nothing."""
    spec = _kill_spec()
    if spec is None or spec[0] != name:
        return
    _kill_hits[name] = _kill_hits.get(name, 0) + 1
    if _kill_hits[name] == spec[1]:
        sys.stderr.write(f"{KILL_ENV}: killed at {name}:{spec[1]}\n")
        sys.stderr.flush()
        os._exit(KILL_EXIT_CODE)


class RunDirError(ValueError):
    """A run-directory problem (not a directory, not writable, a malformed log); the message names the path."""


def write_text(path: Path, text: str) -> None:
    """Atomic whole-file write (weights.atomic_write_text), with the kill point ``write.<name>`` before the rename."""
    path = Path(path)
    atomic_write_text(path, text, before_replace=lambda: kill_point(f"write.{path.name}"))


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON file. NaN and infinity are refused (they are not JSON)."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def replace_dir(final: Path, fill, point: str) -> None:
    """Build a folder atomically: ``fill(tmp)`` writes into a temporary folder beside ``final``, which is then
    renamed to ``final`` (an older ``final`` is moved aside first and removed after). A kill at any moment leaves
    either the old folder, the new one, or none, plus temporaries that ``RunDir.remove_temporaries`` clears."""
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    old = None
    try:
        kill_point(f"{point}.tmp_created")
        fill(tmp)
        for item in tmp.rglob("*"):
            if item.is_file():
                with open(item, "rb") as f:
                    os.fsync(f.fileno())
        kill_point(f"{point}.written")
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old.", suffix=".tmp"))
            os.replace(final, old / final.name)
            kill_point(f"{point}.old_moved")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _KillingWriter:
    """A binary file wrapper that passes the kill point ``checkpoint.writing`` after every chunk written."""

    def __init__(self, f):
        self.f = f

    def write(self, data) -> int:
        n = self.f.write(data)
        self.f.flush()
        kill_point("checkpoint.writing")
        return n

    def flush(self) -> None:
        self.f.flush()


class RunDir:
    """Writes one run's files; every whole-file write is atomic, the JSONL logs are appended line by line."""

    LOGS = ("metrics.jsonl", "weights.jsonl")

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path}: run directory exists and is not a directory (choose another run_dir)")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"{self.path}: cannot create the run directory: {e.strerror or e}") from None
        self.checkpoints = self.path / "checkpoints"
        if self.checkpoints.exists() and not self.checkpoints.is_dir():
            raise RunDirError(f"{self.checkpoints}: exists and is not a directory")
        for folder in (self.path, self.checkpoints):
            if folder.is_dir():
                self._check_writable(folder)

    @staticmethod
    def _check_writable(folder: Path) -> None:
        try:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_probe.", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise RunDirError(f"{folder}: not writable ({e.strerror or e}); fix its permissions or choose another "
                              f"run_dir") from None

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files and folders a killed run left (``.*.tmp`` here and in checkpoints/)."""
        found = list(self.path.glob(".*.tmp"))
        if self.checkpoints.is_dir():
            found += list(self.checkpoints.glob(".*.tmp"))
        for item in found:
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
        if found:
            log.info("removed %d temporary file(s) left by an interrupted run in %s", len(found), self.path)
        return found

    def clear(self) -> None:
        """Remove an earlier run's outputs (files, logs, checkpoints, tokenizer), so a fresh run owns the folder.
        Other files in the folder are left alone."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        for folder in (self.checkpoints, self.path / "tokenizer"):
            if folder.is_dir():
                shutil.rmtree(folder)
        self.remove_temporaries()

    # JSONL logs -------------------------------------------------------------------------------------------
    def append(self, name: str, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
        with open(self.path / name, "a") as f:
            if kill_armed("log.mid_line"):  # the hook: half a line on disk, then the kill
                f.write(line[: len(line) // 2])
                f.flush()
                kill_point("log.mid_line")
                line = line[len(line) // 2:]
            f.write(line)

    def read_log(self, name: str) -> list[tuple[str, dict]]:
        """(line, record) of each line of a JSONL log. A last line without its newline (a write cut short by a
        kill) that does not parse is dropped with a warning; any other malformed line raises RunDirError naming
        the file and the line number."""
        path = self.path / name
        lines = path.read_text(encoding="utf-8").split("\n")
        partial = lines[-1] != ""  # a complete file ends with a newline, so its last piece is empty
        if not partial:
            lines.pop()
        out = []
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if partial and lineno == len(lines):
                    log.warning("%s:%d: dropped a partial last line (a write cut short): %r", path, lineno, line[:80])
                    continue
                raise RunDirError(f"{path}:{lineno}: malformed JSON line: {e.msg} (column {e.colno})") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise RunDirError(f"{path}:{lineno}: expected an object with an integer 'step'")
            out.append((line, record))
        return out

    def truncate_logs(self, completed_steps: int) -> None:
        """On resume, drop log lines of steps after the checkpoint (they will be redone identically), and a
        partial last line."""
        for name in self.LOGS:
            path = self.path / name
            if path.exists():
                keep = [line for line, record in self.read_log(name) if record["step"] < completed_steps]
                write_text(path, "".join(line + "\n" for line in keep))

    def reset_logs(self) -> None:
        for name in (*self.LOGS, "weights.json"):
            (self.path / name).unlink(missing_ok=True)

    # checkpoints ------------------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoints.is_dir():
            return None
        found = sorted(self.checkpoints.glob("step_*.pt"))
        return found[-1] if found else None

    def save_checkpoint(self, step: int, state: dict, keep: int = 1) -> Path:
        """torch.save into a temporary file, fsync, then rename: a killed save never leaves a partial checkpoint
        (only a ``.step_*.tmp`` that the next start removes)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints / f"step_{step:07d}.pt"
        fd, tmp = tempfile.mkstemp(dir=self.checkpoints, prefix=".step_", suffix=".tmp")
        os.close(fd)
        try:
            kill_point("checkpoint.tmp_created")
            if kill_armed("checkpoint.writing"):
                with open(tmp, "wb") as f:
                    torch.save(state, _KillingWriter(f))
            else:
                torch.save(state, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            kill_point("checkpoint.tmp_written")
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        kill_point("checkpoint.replaced")
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
