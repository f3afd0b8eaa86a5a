"""One runner for every experiment driver: a campaign is a list of units, each of which declares what it needs, how
to tell that it is finished, how to run it and what it publishes.

    units = [Unit("reweight_seed0", run=..., done=..., publish=...), Unit("arm_x", needs=("reweight_seed0",), ...)]
    Campaign("protocol", units, command=[python, "protocol.py", "--runs", DIR]).run(jobs=2)

A unit is *done* when its finished work is under the runs folder (this machine's own work, never the committed
results); ``run`` resumes by itself (reweighting from its checkpoint), so running a campaign again after a kill
continues where it stopped. ``publish`` copies a finished unit's small files into ``results/`` at once;
``publish_partial`` does the same for a unit still in flight (a reweighting seed's trajectory so far), so that each
session can commit what it has. ``status()`` renders every unit as done / partial / to do / waiting, the hours left at
the measured speeds, and the command that continues.

``jobs > 1`` runs that many units at once, each in its own process (the driver's command with ``--only NAME --jobs 1``),
which is how two one-thread streams share a 2-core machine; with ``jobs == 1`` units run in this process, in order.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .files import write_text

log = logging.getLogger("scalebio.stages")


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def makespan_s(left_s: dict[str, float], needs: dict[str, tuple[str, ...]], jobs: int, cores: int) -> float:
    """Seconds until all of ``left_s``'s units finish when up to ``jobs`` run at once, in the dict's order as their
    ``needs`` (among ``left_s``'s units) allow, on ``cores`` cores shared evenly (each unit is one thread: alone on a
    core it takes its ``left_s``; n > cores units run at cores / n of that speed)."""
    left = {k: v for k, v in left_s.items()}
    waiting, running, clock = list(left), [], 0.0
    while waiting or running:
        for name in list(waiting):
            if len(running) >= max(1, jobs):
                break
            if all(n not in left for n in needs.get(name, ())):
                waiting.remove(name)
                running.append(name)
        if not running:
            raise ValueError(f"units {waiting} wait for each other")
        speed = min(1.0, cores / len(running))
        dt = min(left[n] for n in running) / speed
        clock += dt
        for n in list(running):
            left[n] -= dt * speed
            if left[n] <= 1e-9:
                running.remove(n)
                del left[n]
    return clock


@dataclass
class Unit:
    """One resumable piece of a campaign."""

    name: str
    run: Callable[[], object]
    """Does (or continues) the work under the runs folder."""
    done: Callable[[], bool]
    """True when the finished work is under the runs folder."""
    publish: Callable[[], None] | None = None
    """Copies the finished unit's small files into the results folder."""
    needs: tuple[str, ...] = ()
    """Units that must be done before this one starts."""
    kind: str = ""
    """What the unit is (``reweight``, ``arm``, ``evaluate`` ...): the measured speed is per kind."""
    estimate_s: float = 0.0
    """Seconds the whole unit takes on one stream (for the hours left)."""
    progress: Callable[[], tuple[int, int] | None] | None = None
    """(completed steps, total steps) of a unit in flight, None when it has not started."""
    publish_partial: Callable[[], None] | None = None
    """Copies a unit in flight's small files into the results folder, marked partial."""
    where: Path | None = None
    """Its working folder (checkpoints live here)."""
    check: Callable[[], None] | None = None
    """Raises when the unit must not start (settings that differ from the campaign's, say)."""


@dataclass
class UnitState:
    name: str
    state: str  # done | partial | to do | waiting
    detail: str = ""
    left_s: float = 0.0


class UnitFailed(RuntimeError):
    """A unit's process exited with an error (its log names the cause)."""


class CampaignStopped(RuntimeError):
    """The campaign's driver was stopped by a signal, which it passed to its units' processes: each finished or
    abandoned its step, wrote a checkpoint and exited. Running the same command again continues."""

    exit_code = 1
    """128 + the signal's number, as a shell reports a process ended by it."""


@dataclass
class Campaign:
    """A named list of units in a valid order (every unit after the units it needs)."""

    name: str
    units: list[Unit]
    command: list[str] = field(default_factory=list)
    """The command that runs this campaign (``--jobs N`` is appended; ``--only NAME --jobs 1`` for one unit)."""
    logs: Path | None = None
    """Where each unit's process writes ``<name>.log`` when ``jobs > 1``."""

    def __post_init__(self):
        names = [u.name for u in self.units]
        if len(set(names)) != len(names):
            raise ValueError(f"campaign {self.name}: unit names repeat: {names}")
        seen: set[str] = set()
        for u in self.units:
            missing = [n for n in u.needs if n not in seen]
            if missing:
                raise ValueError(f"campaign {self.name}: unit {u.name} needs {missing}, which are not listed before it")
            seen.add(u.name)

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(f"campaign {self.name} has no unit {name!r}; its units: {', '.join(u.name for u in self.units)}")

    # ---- status -------------------------------------------------------------------------------------------

    def states(self) -> list[UnitState]:
        done = {u.name for u in self.units if u.done()}
        out = []
        for u in self.units:
            if u.name in done:
                out.append(UnitState(u.name, "done"))
                continue
            prog = u.progress() if u.progress else None
            if prog and prog[0] > 0:
                n, total = prog
                out.append(UnitState(u.name, "partial", f"step {n} of {total}, {_checkpoint_note(u.where)}",
                                     u.estimate_s * (1 - n / total)))
            elif all(n in done for n in u.needs):
                out.append(UnitState(u.name, "to do", "", u.estimate_s))
            else:
                out.append(UnitState(u.name, "waiting", "needs " + ", ".join(n for n in u.needs if n not in done),
                                     u.estimate_s))
        return out

    def hours_left(self, jobs: int, cores: int | None = None, states: list[UnitState] | None = None) -> float:
        """Wall-clock hours until every unit is done, running ``jobs`` units at once on ``cores`` cores (default: the
        cores this process may use): each unit's ``left_s`` is its time alone on one core (a one-thread process), a
        unit starts when the units it needs are done, and more units than cores share them. Not the stream-hours
        divided by ``jobs``: a unit cannot be split, so a last long unit, or a chain of units, sets the time."""
        states = self.states() if states is None else states
        cores = cores or available_cores()
        return makespan_s({s.name: s.left_s for s in states if s.state != "done"},
                          {u.name: u.needs for u in self.units}, jobs, cores) / 3600

    def status(self, jobs: int = 2, cores: int | None = None) -> str:
        """A Markdown report: every unit's state, the hours left with ``jobs`` units at once, the command that
        continues."""
        states = self.states()
        left = sum(s.left_s for s in states)
        cores = cores or available_cores()
        lines = [f"# Campaign `{self.name}`: status", "",
                 f"Written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {socket.gethostname()}.", "",
                 "| unit | state | detail | hours left (one stream) |", "|---|---|---|---|"]
        for s in states:
            lines.append(f"| {s.name} | {s.state} | {s.detail or '—'} | {s.left_s / 3600:.1f} |")
        n_done = sum(s.state == "done" for s in states)
        lines += ["", f"{n_done} of {len(states)} units done. Left: {left / 3600:.1f} stream-hours, about "
                      f"{self.hours_left(jobs, cores, states):.1f} h with {jobs} units at once on {cores} cores (at the "
                      "measured speeds; a unit in flight counts its steps left; a unit waits for the units it needs).",
                  ""]
        if n_done < len(states) and self.command:
            lines += ["Continue with:", "", "```", shlex.join([*self.command, "--jobs", str(jobs)]), "```", ""]
        return "\n".join(lines)

    # ---- running ------------------------------------------------------------------------------------------

    def _ready(self, pending: list[Unit], done: set[str], running: set[str]) -> Unit | None:
        for u in pending:
            if u.name not in running and all(n in done for n in u.needs):
                return u
        return None

    def run(self, jobs: int = 1, only: list[str] | None = None, publish_every_s: float = 600.0) -> None:
        """Run every unit that is not done (``only``: just these, in campaign order), ``jobs`` at a time; publish each
        as it finishes. A unit whose ``needs`` are not done waits (or, with ``only``, is an error)."""
        chosen = [u for u in self.units if only is None or u.name in only]
        if only:
            unknown = set(only) - {u.name for u in self.units}
            if unknown:
                raise KeyError(f"campaign {self.name} has no unit(s) {sorted(unknown)}")
        for u in chosen:
            if u.check:
                u.check()  # refuse before anything starts, not halfway through the campaign
        done: set[str] = set()
        chosen_names = {u.name for u in chosen}
        for u in self.units:  # in order, so a unit's results are in place before the units that need it are checked
            if u.done():
                done.add(u.name)
                if u.name in chosen_names and u.publish:
                    u.publish()  # finished earlier on this machine: make sure its results are in place
        pending = [u for u in chosen if u.name not in done]
        if only:
            for u in pending:
                blocked = [n for n in u.needs if n not in done and n not in only]
                if blocked:
                    raise RuntimeError(f"unit {u.name} needs {blocked}, which are not done: run them first")
        start, total, finished = time.time(), len(pending), [0]  # units finished by this run (a cell: report reads it)

        def report(what: str) -> None:
            elapsed = time.time() - start
            left = self.hours_left(jobs, states=[s for s in self.states() if s.name in chosen_names])
            log.info("[%s %d/%d] %s (elapsed %.0f min, about %.1f h left)", self.name, finished[0], total, what,
                     elapsed / 60, left)

        if jobs <= 1:
            while pending:
                u = self._ready(pending, done, set())
                if u is None:
                    raise RuntimeError(f"units {[p.name for p in pending]} wait for units outside this run")
                report(f"{u.name}: start")
                u.run()
                if not u.done():
                    raise UnitFailed(f"unit {u.name} ran but is not done (see its log above)")
                if u.publish:
                    u.publish()
                pending.remove(u)
                done.add(u.name)
                finished[0] += 1
                report(f"{u.name}: done")
            return

        if not self.command:
            raise ValueError(f"campaign {self.name}: jobs > 1 needs the driver's command")
        logs = self.logs or Path.cwd()
        logs.mkdir(parents=True, exist_ok=True)
        running: dict[str, subprocess.Popen] = {}
        failed: list[str] = []
        stopped: list[str] = []

        def stop(signum: int, frame) -> None:
            # SIGTERM / SIGINT / SIGUSR1 (a scheduler's warning, Ctrl-C): start nothing new, and pass the signal to
            # every unit in flight, which checkpoints and exits (scalebio.results.SignalWatch)
            name = signal.Signals(signum).name
            if not stopped:
                log.warning("%s received: passing it to %s, which write a checkpoint and stop; starting nothing new",
                            name, ", ".join(running) or "no unit in flight")
            stopped.append(name)
            for proc in running.values():
                if proc.poll() is None:
                    proc.send_signal(signum)

        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                previous[sig] = signal.signal(sig, stop)
        try:
            self._run_processes(pending, done, running, failed, stopped, finished, jobs, logs, report, publish_every_s)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if stopped:
            again = f": {shlex.join([*self.command, '--jobs', str(jobs)])}" if self.command else ""
            error = CampaignStopped(f"campaign {self.name}: stopped by {stopped[0]}; its units in flight wrote "
                                    f"checkpoints (logs in {logs}). To continue, run the same command again{again}")
            error.exit_code = 128 + int(getattr(signal, stopped[0]))
            raise error
        if failed:
            raise UnitFailed(f"campaign {self.name}: unit(s) {failed} failed; see their logs in {logs}")

    def _run_processes(self, pending: list[Unit], done: set[str], running: dict[str, subprocess.Popen],
                       failed: list[str], stopped: list[str], finished: list[int], jobs: int, logs: Path, report,
                       publish_every_s: float) -> None:
        """The loop of ``run`` with ``jobs`` > 1: start ready units as processes, collect them as they end."""
        last_partial = time.time()
        while pending or running:
            while not failed and not stopped and len(running) < jobs:
                u = self._ready(pending, done, set(running))
                if u is None:
                    break
                cmd = [*self.command, "--only", u.name, "--jobs", "1"]
                out = open(logs / f"{u.name}.log", "a")
                report(f"{u.name}: start in its own process (log: {logs / (u.name + '.log')})")
                running[u.name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
                out.close()
            if not running:
                if failed or stopped:
                    break
                raise RuntimeError(f"units {[p.name for p in pending]} wait for units outside this run")
            time.sleep(2)
            for name, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                u = self.unit(name)
                pending.remove(u)
                if proc.returncode == 0 and u.done():
                    done.add(name)
                    finished[0] += 1
                    report(f"{name}: done")
                elif stopped:
                    report(f"{name}: stopped (exit {proc.returncode}; log: {logs / (name + '.log')})")
                    if u.publish_partial:
                        u.publish_partial()  # its trajectory so far, as the periodic publication does
                else:
                    failed.append(name)
                    report(f"{name}: FAILED (exit {proc.returncode}; log: {logs / (name + '.log')})")
            if time.time() - last_partial > publish_every_s:
                last_partial = time.time()
                for name in running:
                    u = self.unit(name)
                    if u.publish_partial:
                        u.publish_partial()


EARLIER_FILE = "earlier_processes.json"
"""In a unit's work folder: the wall time of its processes that stopped before it was done (a signal, an error)."""


def earlier_processes(work: Path) -> dict:
    """What the unit's processes that stopped before it was done recorded (``counted``); zeros when none did."""
    f = Path(work) / EARLIER_FILE
    return json.loads(f.read_text()) if f.is_file() else {"processes": 0, "wall_time_s": 0.0, "started": None}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


@contextmanager
def counted(work: Path, started: float):
    """Around a unit's run: a process that stops before the unit is done (a signal, an error) adds its wall time to
    the work folder's EARLIER_FILE, so that the unit's record counts every process a resumed unit took."""
    try:
        yield
    except BaseException:
        earlier = earlier_processes(work)
        write_text(Path(work) / EARLIER_FILE, json.dumps({
            "processes": earlier["processes"] + 1,
            "wall_time_s": round(earlier["wall_time_s"] + time.time() - started, 1),
            "started": earlier["started"] or _iso(started)}, indent=2) + "\n")
        raise


def unit_record(name: str, started: float, extra: dict | None = None, work: Path | None = None) -> dict:
    """What a finished unit writes beside its results: when and where it ran, and the code revision. Given its work
    folder, the wall time and start are summed over the unit's earlier processes (``counted``); a process killed
    outright (SIGKILL) is not counted."""
    from .precision import cpu_bf16_flags
    from .results import git_revision

    record = {"unit": name, "git_revision": git_revision(), "host": socket.gethostname(), "started": _iso(started),
              "finished": _iso(time.time()),
              "wall_time_s": round(time.time() - started, 1), "cpu_bf16_flags": list(cpu_bf16_flags()), **(extra or {})}
    earlier = earlier_processes(work) if work is not None else {"processes": 0}
    if earlier["processes"]:
        record.update(started=earlier["started"], processes=earlier["processes"] + 1,
                      wall_time_s=round(record["wall_time_s"] + earlier["wall_time_s"], 1))
    return record


ABSENT = "<absent>"


def settings_diff(recorded: dict, current: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted name, recorded value, current value) of every setting that differs between two nested dicts; a key
    on one side only gives ``ABSENT`` on the other."""
    out = []
    for key in sorted(set(recorded) | set(current), key=str):
        name = f"{prefix}{key}"
        a, b = recorded.get(key, ABSENT), current.get(key, ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_diff(a, b, name + ".")
        elif a != b:
            out.append((name, a, b))
    return out


def _checkpoint_note(where: Path | None) -> str:
    """Where a partial unit's progress is kept, or that none is yet: a unit whose process dies before it writes a
    checkpoint (a run writes one every few steps, or on SIGTERM / SIGINT / SIGUSR1) starts again at step 0."""
    if where is None:
        return "no checkpoint"
    if Path(where).is_dir() and any(Path(where).iterdir()):
        return f"checkpoint in {where}"
    return f"no checkpoint in {where} yet (if its process dies now, it starts again at step 0)"
