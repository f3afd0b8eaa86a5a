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

One process per run directory (``RunLock``): ``run.lock`` records the owner (pid, host, start time, command) and
is held with an exclusive ``flock`` for the owner's life, so a process that died (``kill -9``) leaves no lock that
counts. Signals (``SignalWatch``): SIGTERM, SIGINT and SIGUSR1 end a run after its current step with a
checkpoint (``RunInterrupted``); ``SCALEBIO_SIGNAL_AT=<point>:<n>:<SIGNAME>[@<rank>]`` sends one at a named point,
for tests.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from . import files

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
    """The git commit of the checkout containing ``start`` (default: this package), with '+dirty' if a tracked file
    outside ``results/`` and ``figures/`` is modified (what runs publish there does not change what the code
    computes: a campaign's checkout publishes into its own results/ while its units run)."""
    where = start or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)results", ":(top,exclude)figures"], cwd=where,
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
    like ``kill -9``) the n-th time this process passes the point ``name``. Unset, it does nothing. The same
    point serves ``SCALEBIO_SIGNAL_AT`` (``signal_point``)."""
    signal_point(name)
    spec = _kill_spec()
    if spec is None or spec[0] != name:
        return
    _kill_hits[name] = _kill_hits.get(name, 0) + 1
    if _kill_hits[name] == spec[1]:
        sys.stderr.write(f"{KILL_ENV}: killed at {name}:{spec[1]}\n")
        sys.stderr.flush()
        os._exit(KILL_EXIT_CODE)


SIGNAL_ENV = "SCALEBIO_SIGNAL_AT"
_signal_hits: dict[str, int] = {}


def signal_point(name: str) -> None:
    """``SCALEBIO_SIGNAL_AT=<name>:<n>:<SIGNAME>`` sends SIGNAME to this process the n-th time it passes the point
    ``name`` (counting afresh after each signal sent, so each run in one process gets one; with ``@<rank>``
    appended: only the process whose ``RANK`` is that). Unset, it does nothing."""
    spec = os.environ.get(SIGNAL_ENV)
    if not spec:
        return
    spec, _, rank = spec.partition("@")
    point, count, signame = spec.rsplit(":", 2)
    if point != name or (rank and os.environ.get("RANK", "0") != rank):
        return
    _signal_hits[name] = _signal_hits.get(name, 0) + 1
    if _signal_hits[name] == int(count):
        _signal_hits[name] = 0
        os.kill(os.getpid(), getattr(signal, signame))


class RunDirError(ValueError):
    """A run-directory problem (not a directory, not writable, a malformed log); the message names the path."""


class ResumeError(ValueError):
    """The run directory's checkpoint does not belong to this config or these data files."""


# ---------------------------------------------------------------------------------------------------------
# One process per run directory.

LOCK_FILE = "run.lock"
HEARTBEAT_S = 60.0
"""The owner touches run.lock (its mtime) this often."""
STALE_AFTER_S = 600.0
"""Without flock (file systems that lack it), another host's lock whose mtime is older than this is stale."""


class RunLockedError(RunDirError):
    """Another live process owns the run directory; the message names the directory and the process."""


def _process_start(pid: int) -> str | None:
    """When a process started (field 22 of /proc/<pid>/stat, clock ticks since boot): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` (on this host) is alive and is the one that started at ``start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    now = _process_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """Ownership of a run directory by one process (rank 0 of a distributed run): ``RUN_DIR/run.lock``.

    The file records the owner (pid, host, start time, command) and is held with an exclusive ``flock`` while
    the owner runs; the kernel (or, on a shared file system, the file server) drops the flock when the owner
    dies, so a lock left by ``kill -9`` never blocks the next start: the file is then simply taken over. A
    file system without flock falls back to the record: the lock is stale when its pid is dead on this host, or,
    from another host, when its heartbeat (the file's mtime, touched every ``HEARTBEAT_S``) is older than
    ``STALE_AFTER_S``. Deleting ``run.lock`` by hand overrides it. ``release`` removes the file.
    """

    def __init__(self, run_dir: str | Path, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def record(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)}

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunLockedError; changes nothing in the directory when refused."""
        for _ in range(10):  # a retry only when the owner released (and removed) the file meanwhile
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise RunLockedError(self._refusal(holder)) from None
            except (OSError, ImportError) as e:  # no flock on this file system
                try:
                    return self._acquire_by_record(fd, e)
                except BaseException:
                    os.close(fd)
                    raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._own(fd)
                return self
            os.close(fd)
        raise RunLockedError(f"{self.run_dir}: could not take {self.path} (it kept being replaced)")

    def _acquire_by_record(self, fd: int, why: Exception) -> "RunLock":
        holder = self._read(fd)
        if holder and not self._stale(holder, os.fstat(fd).st_mtime):
            raise RunLockedError(self._refusal(holder))
        log.warning("%s: no flock on this file system (%s); ownership is decided by the pid, host and heartbeat "
                    "recorded in the file", self.path, getattr(why, "strerror", None) or why)
        self._own(fd)
        return self

    def _stale(self, holder: dict, mtime: float) -> bool:
        if holder.get("host") == socket.gethostname():
            pid = holder.get("pid")
            return not (isinstance(pid, int) and _pid_alive(pid, holder.get("process_start")))
        return time.time() - mtime > self.stale_after_s

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            text = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")
            holder = json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            holder = {}
        return holder if isinstance(holder, dict) else {}

    def _refusal(self, holder: dict) -> str:
        who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
               + (f", command: {holder['command']}" if holder.get("command") else ""))
        return (f"{self.run_dir}: run directory in use by another scalebio process ({who}); nothing was changed. "
                f"Wait for it to end or stop it; if that process is gone (a lost node), delete {self.path}")

    def _own(self, fd: int) -> None:
        data = (json.dumps(self.record()) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self.fd = fd
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="scalebio-run-lock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.fd)
            except (OSError, TypeError):
                return

    def release(self) -> None:
        """Remove run.lock and drop the flock (removed while still held, so no other process takes a file that
        is about to disappear)."""
        if self.fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def own_run_dir(run_dir: str | Path, rank: int, world: int) -> RunLock | None:
    """Rank 0 takes ``RunLock(run_dir)``; the ranks of one run are one owner. A refusal raises RunLockedError on
    every rank (collective when ``world`` > 1). Returns the lock on rank 0, None elsewhere."""
    lock, error = None, None
    if rank == 0:
        try:
            if not Path(run_dir).is_dir():
                RunDir(run_dir)  # creates it, or says what is wrong (a file)
            try:
                lock = RunLock(run_dir).acquire()  # before RunDir's write probes: a refusal changes nothing
            except OSError:
                RunDir(run_dir)  # says what is wrong (not writable)
                raise
            try:
                RunDir(run_dir)
            except RunDirError:
                lock.release()
                raise
        except RunDirError as e:
            error = e
    if world > 1:
        import torch.distributed as dist

        box = [None if error is None else (type(error).__name__, str(error))]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            kind = RunLockedError if box[0][0] == "RunLockedError" else RunDirError
            error = kind(f"{box[0][1]} (rank 0's refusal, seen on rank {rank})")
    if error is not None:
        raise error
    return lock


# ---------------------------------------------------------------------------------------------------------
# Signals: finish the step, checkpoint, stop.

INTERRUPT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
"""What ends a run gracefully: a kill or a scheduler's preemption, Ctrl-C, SLURM's ``--signal`` warning."""


class RunInterrupted(Exception):
    """A run stopped by a signal after a completed step, its state checkpointed (or with no step done yet).
    ``exit_code`` is 128 + the signal number, as a shell reports a process the signal ended."""

    def __init__(self, signal_name: str, run_dir: str | Path, step: int | None = None, total: int | None = None,
                 checkpoint: str | Path | None = None):
        self.signal_name, self.run_dir, self.step, self.total = signal_name, str(run_dir), step, total
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.exit_code = 128 + int(getattr(signal, signal_name))
        if step:
            where = f"after step {step} of {total}" + (f" (checkpoint {self.checkpoint})" if self.checkpoint else "")
        else:
            where = "before its first step"
        super().__init__(f"{self.run_dir}: interrupted by {signal_name} {where}")

    def resume_line(self, command: str | None) -> str:
        """One line for a person: what happened and the command that resumes."""
        again = f": {command}" if command else ""
        return f"{self}; to resume, run the same command again{again}"


class SignalWatch:
    """While installed (a context manager, in the main thread), SIGTERM, SIGINT and SIGUSR1 are caught. Before
    ``defer()`` a signal raises RunInterrupted at once (nothing to save yet); after it, the signal is only
    recorded and the training loop asks ``pending`` between steps, so the step in progress completes. The
    previous handlers come back on exit."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = run_dir
        self.received: str | None = None
        self.deferring = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "SignalWatch":
        if threading.current_thread() is threading.main_thread():
            for name in INTERRUPT_SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def defer(self) -> None:
        self.deferring = True

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            if self.deferring:
                log.warning("%s received: finishing the current step, then writing a checkpoint and stopping", name)
        if not self.deferring:
            raise RunInterrupted(name, self.run_dir)

    def pending(self, world: int = 1) -> str | None:
        """The signal received (on any rank: a collective when ``world`` > 1), or None."""
        if world == 1:
            return self.received
        from .distributed import all_reduce

        seen = torch.zeros(len(INTERRUPT_SIGNALS), dtype=torch.float64)
        if self.received is not None:
            seen[INTERRUPT_SIGNALS.index(self.received)] = 1
        seen = all_reduce(seen)
        hit = [name for name, n in zip(INTERRUPT_SIGNALS, seen.tolist()) if n > 0]
        return hit[0] if hit else None


def write_text(path: Path, text: str) -> None:
    """Atomic whole-file write (files.write_text), with the kill point ``write.<name>`` before the rename."""
    path = Path(path)
    files.write_text(path, text, before_replace=lambda: kill_point(f"write.{path.name}"))


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
        # The probe's name must not match remove_temporaries' ``.*.tmp``: on several ranks, rank 0 clears
        # temporaries while the others construct their RunDir, and would delete a probe before its owner does.
        try:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write_probe.", suffix=".probe")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            if isinstance(e, FileNotFoundError) and not folder.exists():
                return  # rank 0 removed it meanwhile (RunDir.clear): it is made again when needed
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
                write_text(path, text.replace(prefix, ""))


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
    write_text(out / "resample.json", json.dumps(manifest, indent=2) + "\n")
    shutil.copy2(work / "finetune" / "metrics.jsonl", out / "finetune_metrics.jsonl")
    shutil.copy2(work / "eval.json", out / "eval.json")
    relativize(out, root)


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file; a malformed line raises an error naming the file and the line."""
    from .data import read_records

    return read_records(Path(path))
