"""Committed vs recomputed: the report a reproduce pipeline ends with.

A pipeline recomputes its results and writes them over the committed ones; the committed ones are then read
back from git (``committed_tree``: the folder as it is in ``HEAD``), so nothing has to be snapshotted first.
Each experiment states its claims as ``Claim`` rows computed from a results folder; the same function runs
on both folders and ``compare_claims`` pairs the rows by key. ``compare_files`` says, file by file, whether
the recomputed results are byte-identical to the committed ones, equal in every value but run metadata (wall
time, timestamps, git revision, host), or different, and by how much. ``render_report`` makes the short
markdown report; it is a pure function of the two folders (no clock, no host), so it is the same text every
time the same results are compared.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

VOLATILE_KEYS = frozenset({"started", "updated", "created", "wall_time_s", "git_revision", "hardware", "versions",
                           "config_digest", "weights_sha256"})
"""Keys of the run-directory files (scalebio.results, scalebio.weights, scalebio.resample) that describe the run
rather than its result: when and where it ran, the digest of a config that holds the checkout's absolute paths
(the config itself is compared as config.yaml), and the hash of a weights file that holds a timestamp."""


@dataclass(frozen=True)
class Claim:
    """One claim measured on one results folder.

    ``key`` pairs a committed claim with its recomputed counterpart; ``value`` is the measured value as the
    claims table shows it; ``holds`` is None for a measured value that has no pass/fail (e.g. learned weights).
    """

    key: str
    experiment: str
    claim: str
    value: str
    holds: bool | None


def committed_tree(repo: str | Path, rel: str | Path, dest: str | Path, rev: str = "HEAD") -> Path | None:
    """Write the committed version of folder ``rel`` (relative to the checkout ``repo``) at ``rev`` under
    ``dest`` and return ``dest/rel``; None when ``repo`` is not a git checkout or ``rel`` is not in ``rev``."""
    try:
        out = subprocess.run(["git", "archive", "--format=tar", rev, "--", str(rel)], cwd=repo, capture_output=True,
                             timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
        tar.extractall(dest, filter="data")
    folder = Path(dest) / rel
    return folder if folder.is_dir() else None


def committed_revision(repo: str | Path, rev: str = "HEAD") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", rev], cwd=repo, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# ------------------------------------------------------------------------- stages this checkout finished


def reweight_finished(run_dir: str | Path, cfg) -> bool:
    """True when ``run_dir`` holds the final weights of a reweighting run of exactly ``cfg`` (a RunConfig): work
    this checkout finished, which a pipeline need not redo. A run of another config is not finished."""
    from .config import config_digest

    weights = Path(run_dir) / "weights.json"
    if not weights.is_file():
        return False
    return json.loads(weights.read_text()).get("provenance", {}).get("config_digest") == config_digest(cfg)


def arm_finished(work: str | Path, weights: str | Path | None, run_weights: str | Path | None = None) -> dict | None:
    """The resample manifest of a retrain arm finished in ``work`` (its ``train.jsonl.manifest.json`` and
    ``eval.json``) from the weights file ``weights`` (None: uniform), else None.

    An arm drawn from another weights file (the reweighting was redone since: weights.json has a new timestamp)
    is not finished. ``run_weights``: the weights.json of the reweighting run the arm otherwise depends on (its
    pool and tokenizer; for the uniform arm); an arm evaluated before that file was last written is not finished.
    """
    from .files import file_sha256

    work = Path(work)
    manifest_file, eval_file = work / "train.jsonl.manifest.json", work / "eval.json"
    if not (eval_file.is_file() and manifest_file.is_file()):
        return None
    manifest = json.loads(manifest_file.read_text())
    if weights is not None and manifest.get("weights_sha256") != file_sha256(Path(weights)):
        return None
    if run_weights is not None and (not Path(run_weights).is_file()
                                    or Path(run_weights).stat().st_mtime > eval_file.stat().st_mtime):
        return None
    return manifest


def prune(results_root: str | Path, written: set[Path]) -> list[Path]:
    """Remove every file under ``results_root`` outside the folders in ``written`` (results of stages no longer
    run), and the folders left empty, so the folder holds exactly what was recomputed. Returns the removed
    files."""
    results_root = Path(results_root)
    removed = []
    for path in sorted(results_root.rglob("*"), reverse=True):
        if path.is_file() and not any(path.is_relative_to(w) for w in written):
            path.unlink()
            removed.append(path)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed


# ----------------------------------------------------------------------------------------------- claims


def verdict(committed: Claim | None, recomputed: Claim | None) -> str:
    """Whether a committed claim still holds on the recomputed results."""
    if recomputed is None:
        return "not recomputed"
    if committed is None:
        return "new claim: " + {True: "holds", False: "does not hold", None: "measured"}[recomputed.holds]
    if committed.holds is None or recomputed.holds is None:
        return "same value" if committed.value == recomputed.value else "value changed"
    return {(True, True): "still holds", (True, False): "NO LONGER HOLDS", (False, True): "now holds (did not)",
            (False, False): "still does not hold"}[(committed.holds, recomputed.holds)]


def compare_claims(committed: list[Claim], recomputed: list[Claim]) -> list[dict]:
    """Rows {key, experiment, claim, committed, recomputed, verdict}, in the recomputed order, then the committed
    claims that were not recomputed."""
    old = {c.key: c for c in committed}
    new_keys = {c.key for c in recomputed}
    rows = []
    for c in recomputed + [c for c in committed if c.key not in new_keys]:
        before = old.get(c.key)
        after = c if c.key in new_keys else None
        rows.append({"key": c.key, "experiment": c.experiment, "claim": c.claim,
                     "committed": _shown(before), "recomputed": _shown(after), "verdict": verdict(before, after)})
    return rows


def _shown(claim: Claim | None) -> str:
    if claim is None:
        return "—"
    mark = {True: " (holds)", False: " (does not hold)", None: ""}[claim.holds]
    return claim.value + mark


# ------------------------------------------------------------------------------------------------ files


def _leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf, skipping VOLATILE_KEYS."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in VOLATILE_KEYS:
                yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, obj


def _parsed(path: Path) -> Any:
    """A JSON or YAML file as its value, a JSONL file as the list of its lines' values; None otherwise."""
    import yaml

    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if path.suffix == ".json":
            return json.loads(text)
        if path.suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError):
        return None
    return None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def compare_file(committed: Path, recomputed: Path) -> dict:
    """{status, max_abs_diff, where, other} for one file present in both folders.

    status: ``identical`` (same bytes); ``same values`` (a JSON, JSONL or YAML file equal in every value
    outside VOLATILE_KEYS); ``differs``. For a parsed file that differs: ``max_abs_diff`` is the largest
    |committed − recomputed| over numbers at the same place and ``where`` its dotted path (None when no number
    differs); ``other`` counts the other differing places (text, a missing key, a NaN) and ``other_where``
    names the first. A file that does not parse has ``other`` = 1 and no place.
    """
    a, b = committed.read_bytes(), recomputed.read_bytes()
    if a == b:
        return {"status": "identical", "max_abs_diff": 0.0, "where": None, "other": 0, "other_where": None}
    pa, pb = _parsed(committed), _parsed(recomputed)
    if pa is None or pb is None:
        return {"status": "differs", "max_abs_diff": 0.0, "where": None, "other": 1, "other_where": None}
    la, lb = dict(_leaves(pa)), dict(_leaves(pb))
    worst, where, other, other_where = 0.0, None, 0, None
    for key in sorted(la.keys() | lb.keys()):
        x, y = la.get(key, ...), lb.get(key, ...)
        if x == y:
            continue
        d = abs(float(x) - float(y)) if _number(x) and _number(y) else math.nan
        if math.isnan(d):
            other, other_where = other + 1, other_where or key
        elif where is None or d > worst:
            worst, where = d, key
    if where is None and not other:
        return {"status": "same values", "max_abs_diff": 0.0, "where": None, "other": 0, "other_where": None}
    return {"status": "differs", "max_abs_diff": worst, "where": where, "other": other, "other_where": other_where}


def compare_files(committed_root: str | Path | None, recomputed_root: str | Path,
                  exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """Relative path → compare_file's dict, or {status: ``new``} / {status: ``not recomputed``} for a file in
    only one folder. ``exclude``: relative paths to leave out (the report itself)."""
    def files(root):
        if root is None or not Path(root).is_dir():
            return {}
        return {p.relative_to(root).as_posix(): p for p in sorted(Path(root).rglob("*")) if p.is_file()}

    old, new = files(committed_root), files(recomputed_root)
    out = {}
    for rel in sorted(old.keys() | new.keys()):
        if rel in exclude:
            continue
        if rel not in old:
            out[rel] = {"status": "new"}
        elif rel not in new:
            out[rel] = {"status": "not recomputed"}
        else:
            out[rel] = compare_file(old[rel], new[rel])
    return out


# ----------------------------------------------------------------------------------------------- report


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_report(title: str, rows: list[dict], files: dict[str, dict], committed_label: str,
                  results_label: str, largest: int = 5) -> str:
    """The markdown report: a verdict line, the claims table, and the file-by-file summary."""
    broken = [r for r in rows if r["verdict"] in ("NO LONGER HOLDS", "not recomputed")]
    counts: dict[str, int] = {}
    for f in files.values():
        counts[f["status"]] = counts.get(f["status"], 0) + 1
    lines = [f"# {title}", ""]
    if not rows:
        lines.append("No claims could be measured on the recomputed results.")
    elif all(r["committed"] == "—" for r in rows):
        lines.append("Nothing committed to compare with: the recomputed claims only.")
    elif broken:
        lines.append("**Changed:** " + "; ".join(f"{r['experiment']}: {r['claim']} — {r['verdict']}" for r in broken))
    else:
        lines.append(f"Every committed claim that held still holds ({len(rows)} claims compared).")
    lines += ["", f"Committed: {committed_label}. Recomputed: `{results_label}` (see `git diff {results_label}`).", "",
              "| experiment | claim | committed | recomputed | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {_cell(r['experiment'])} | {_cell(r['claim'])} | {_cell(r['committed'])} | {_cell(r['recomputed'])} "
              f"| {r['verdict']} |" for r in rows]
    order = ["identical", "same values", "differs", "new", "not recomputed"]
    lines += ["", "Files: " + ", ".join(f"{counts[s]} {s}" for s in order if s in counts) + f" (of {len(files)}; "
              "\"same values\": equal but for run metadata such as wall time, timestamps, git revision, host)."]
    differing = sorted(((rel, f) for rel, f in files.items() if f["status"] == "differs"),
                       key=lambda x: (-x[1]["max_abs_diff"], -x[1]["other"], x[0]))
    if differing:
        lines.append("")
        lines.append(f"Largest differences (of {len(differing)} differing files):")
        for rel, f in differing[:largest]:
            parts = []
            if f["where"] is not None:
                parts.append(f"max |Δ| {f['max_abs_diff']:.3g} at `{f['where']}`")
            if f["other"]:
                parts.append(f"{f['other']} non-numeric difference{'s' if f['other'] > 1 else ''}"
                             + (f" (first at `{f['other_where']}`)" if f["other_where"] else ""))
            lines.append(f"- `{rel}`: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def write_report(path: str | Path, text: str) -> Path:
    from .files import write_text

    return write_text(path, text)


def reproduce_report(title: str, repo: str | Path, results_rel: str, claims_of, out: str | Path,
                     scratch: str | Path, rev: str = "HEAD") -> str:
    """The whole comparison for one results folder of a checkout.

    ``results_rel``: the folder relative to ``repo`` (recomputed in place); ``claims_of(folder) → list[Claim]``;
    ``out``: the report file (left out of the file comparison); ``scratch``: an empty folder for the committed
    copy. Returns the report's text, also written to ``out``.
    """
    repo, out = Path(repo), Path(out)
    recomputed_root = repo / results_rel
    committed_root = committed_tree(repo, results_rel, scratch, rev)
    sha = committed_revision(repo, rev)
    committed_label = (f"`{results_rel}` at {rev} ({sha[:12]})" if committed_root and sha
                       else f"none (`{results_rel}` is not in git {rev}: nothing to compare with)")
    committed_claims = claims_of(committed_root) if committed_root else []
    rows = compare_claims(committed_claims, claims_of(recomputed_root))
    try:
        skip = (out.resolve().relative_to(recomputed_root.resolve()).as_posix(),)
    except ValueError:
        skip = ()
    files = compare_files(committed_root, recomputed_root, exclude=skip)
    text = render_report(title, rows, files, committed_label, results_rel)
    write_report(out, text)
    return text
