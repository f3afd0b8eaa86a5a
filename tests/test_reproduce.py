"""scalebio.reproduce: committed vs recomputed. Claims are paired by key and judged (still holds / no longer
holds / ...), files are compared value by value with run metadata left out, the committed side is read back
from git HEAD of a checkout, and the report is the same text for the same results. The GPT-2 and offline
LLaMA-3 claim functions are checked on a copy of the committed results with one result broken."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from scalebio.reproduce import (Claim, arm_finished, compare_claims, compare_file, compare_files, committed_tree,
                                prune, render_report, reproduce_report, verdict)

REPO = Path(__file__).resolve().parents[1]


def git_checkout(root: Path, files: dict[str, str]) -> Path:
    """A fresh git repository at ``root`` with ``files`` (relative path → text) committed."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "committed results"], cwd=root, check=True)
    return root


def test_verdicts():
    """Catches a verdict table with committed and recomputed swapped (a claim that broke reported as "now
    holds") or a measured-only claim judged by holds instead of by its value."""
    c = lambda holds, value="v": Claim("k", "e", "claim", value, holds)  # noqa: E731
    assert verdict(c(True), c(True)) == "still holds"
    assert verdict(c(True), c(False)) == "NO LONGER HOLDS"
    assert verdict(c(False), c(True)) == "now holds (did not)"
    assert verdict(c(False), c(False)) == "still does not hold"
    assert verdict(None, c(True)) == "new claim: holds"
    assert verdict(c(True), None) == "not recomputed"
    assert verdict(c(None, "a 0.2"), c(None, "a 0.2")) == "same value"
    assert verdict(c(None, "a 0.2"), c(None, "a 0.3")) == "value changed"


def test_compare_claims_pairs_by_key_and_render_names_the_broken_claim():
    """Catches claims paired by position instead of key, and a report whose first line does not name a claim
    that no longer holds."""
    committed = [Claim("a", "denoising", "weights fall", "-0.98", True), Claim("b", "multi", "target wins", "en", True),
                 Claim("gone", "x", "dropped claim", "1", True)]
    recomputed = [Claim("b", "multi", "target wins", "zh", False), Claim("a", "denoising", "weights fall", "-0.97", True)]
    rows = compare_claims(committed, recomputed)
    by_key = {r["key"]: r for r in rows}
    assert [r["key"] for r in rows] == ["b", "a", "gone"]
    assert by_key["a"]["verdict"] == "still holds" and by_key["a"]["committed"] == "-0.98 (holds)"
    assert by_key["b"]["verdict"] == "NO LONGER HOLDS" and by_key["b"]["recomputed"] == "zh (does not hold)"
    assert by_key["gone"]["verdict"] == "not recomputed" and by_key["gone"]["recomputed"] == "—"
    text = render_report("T", rows, {}, "HEAD", "results/x")
    first = text.splitlines()[2]
    assert first.startswith("**Changed:**") and "target wins — NO LONGER HOLDS" in first and "dropped claim" in first
    ok = render_report("T", compare_claims(committed[:1], committed[:1]), {}, "HEAD", "results/x")
    assert "Every committed claim that held still holds (1 claims compared)." in ok
    nothing = render_report("T", compare_claims([], recomputed), {}, "none", "results/x")
    assert "Nothing committed to compare with" in nothing


def test_compare_file_values_not_metadata(tmp_path):
    """Catches run metadata (wall time, timestamps, git revision, the path-dependent config digest) counted
    as a difference, and a numeric difference reported at the wrong place or size."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    record = {"weights": {"x": 0.25, "y": 0.75}, "provenance": {"created": "t0", "git_revision": "abc",
                                                                "config_digest": "d0", "seed": 0}}
    a.write_text(json.dumps(record))
    b.write_text(json.dumps(record))
    assert compare_file(a, b)["status"] == "identical"
    b.write_text(json.dumps({**record, "provenance": {"created": "t1", "git_revision": "def", "config_digest": "d1",
                                                      "seed": 0}}, indent=1))
    assert compare_file(a, b)["status"] == "same values"
    b.write_text(json.dumps({**record, "weights": {"x": 0.25 + 3e-7, "y": 0.75 - 1e-7}}))
    got = compare_file(a, b)
    assert got["status"] == "differs" and got["where"] == "weights.x" and got["other"] == 0
    assert got["max_abs_diff"] == pytest.approx(3e-7, rel=1e-6)
    b.write_text(json.dumps({**record, "provenance": {**record["provenance"], "seed": "zero"}}))
    got = compare_file(a, b)
    assert got["status"] == "differs" and got["other"] == 1 and got["other_where"] == "provenance.seed"
    la, lb = tmp_path / "m.jsonl", tmp_path / "n.jsonl"
    la.write_text('{"step": 0, "val_loss": 1.5}\n{"step": 1, "val_loss": 1.25}\n')
    lb.write_text('{"step": 0, "val_loss": 1.5}\n{"step": 1, "val_loss": 1.0}\n')
    assert compare_file(la, lb)["where"] == "[1].val_loss" and compare_file(la, lb)["max_abs_diff"] == 0.25


def test_compare_files_new_missing_and_excluded(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for root, names in ((old, ["same.json", "gone.json", "report.md"]), (new, ["same.json", "added.json", "report.md"])):
        for name in names:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(json.dumps({"v": 1, "name": name if name != "report.md" else str(root)}))
    (new / "same.json").write_text((old / "same.json").read_text())
    files = compare_files(old, new, exclude=("report.md",))
    assert {k: v["status"] for k, v in files.items()} == {"added.json": "new", "gone.json": "not recomputed",
                                                          "same.json": "identical"}
    assert all(v["status"] == "new" for v in compare_files(None, new).values())


def test_committed_tree_reads_head_not_the_working_tree(tmp_path):
    """Catches the committed side read from the working tree (after the pipeline overwrote it): the report would
    compare the recomputed results with themselves."""
    repo = git_checkout(tmp_path / "clone", {"results/x/a.json": '{"v": 1}\n', "README.md": "r\n"})
    (repo / "results/x/a.json").write_text('{"v": 2}\n')
    got = committed_tree(repo, "results/x", tmp_path / "scratch")
    assert got == tmp_path / "scratch" / "results" / "x"
    assert json.loads((got / "a.json").read_text()) == {"v": 1}
    assert committed_tree(repo, "results/none", tmp_path / "scratch2") is None
    assert committed_tree(tmp_path / "not_git", "results/x", tmp_path / "scratch3") is None


def _toy_claims(folder: Path) -> list[Claim]:
    value = json.loads((folder / "score.json").read_text())["score"]
    return [Claim("score", "toy", "score above 0.5", f"{value:.2f}", value > 0.5)]


def test_reproduce_report_end_to_end_and_deterministic(tmp_path):
    """A fresh checkout with committed results, recomputed in place: the report names the claim that broke,
    writes the file it prints, leaves the report itself out of the file comparison, and is the same text when
    run again (no clock, no host in it: `make verify` never sees run-specific content)."""
    repo = git_checkout(tmp_path / "clone", {"results/toy/score.json": '{"score": 0.75, "wall_time_s": 3}\n'})
    (repo / "results/toy/score.json").write_text('{"score": 0.25, "wall_time_s": 9}\n')
    out = repo / "results/toy/reproduce_report.md"
    text = reproduce_report("Toy", repo, "results/toy", _toy_claims, out, tmp_path / "s1")
    assert out.read_text() == text
    assert "| toy | score above 0.5 | 0.75 (holds) | 0.25 (does not hold) | NO LONGER HOLDS |" in text
    assert "**Changed:** toy: score above 0.5 — NO LONGER HOLDS" in text
    assert "1 differs (of 1;" in text and "max |Δ| 0.5 at `score`" in text
    again = reproduce_report("Toy", repo, "results/toy", _toy_claims, out, tmp_path / "s2")
    assert again == text


def test_prune_and_arm_finished(tmp_path):
    """Catches a stale result left beside the recomputed ones (a variant no longer run would still be
    committed), and a retrain arm counted as finished although the weights it was drawn from were redone (the
    learned arm by the weights file's hash, the uniform arm by its date)."""
    root = tmp_path / "results"
    for rel in ("main/reweight_seed0/weights.json", "main/retrain/learned_seed0/eval.json", "old_variant/x.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("{}")
    removed = prune(root, {root / "main" / "reweight_seed0", root / "main" / "retrain" / "learned_seed0"})
    assert removed == [root / "old_variant" / "x.json"] and not (root / "old_variant").exists()
    assert (root / "main/reweight_seed0/weights.json").is_file()

    from scalebio.files import file_sha256

    work, weights = tmp_path / "arm", tmp_path / "weights.json"
    work.mkdir()
    weights.write_text('{"created": "t0"}')
    (work / "train.jsonl.manifest.json").write_text(json.dumps({"weights_sha256": file_sha256(weights), "n": 4}))
    assert arm_finished(work, weights) is None  # no eval.json yet: killed before the evaluation
    (work / "eval.json").write_text("{}")
    assert arm_finished(work, weights)["n"] == 4 and arm_finished(work, None)["n"] == 4
    os.utime(weights, (1000, 1000))
    assert arm_finished(work, None, run_weights=weights)["n"] == 4
    weights.write_text('{"created": "t1"}')  # the reweighting was redone
    assert arm_finished(work, weights) is None
    os.utime(weights, (time.time() + 10, time.time() + 10))
    assert arm_finished(work, None, run_weights=weights) is None  # the uniform arm too: new pool, new tokenizer


def _results_checkout(tmp_path: Path, rel: str) -> Path:
    """A fresh git checkout holding a copy of the committed results folder ``rel`` (and nothing else)."""
    src = REPO / rel
    files = {str(Path(rel) / p.relative_to(src)): p.read_text() for p in src.rglob("*") if p.is_file()
             and p.name != "reproduce_report.md"}
    return git_checkout(tmp_path / "clone", files)


def test_gpt2_report_reproduce(tmp_path):
    """experiments/gpt2/report.py --reproduce on a checkout of the committed GPT-2 results where one recomputed
    run's weights now favour another source: that claim no longer holds, the others still hold."""
    if not list((REPO / "results" / "gpt2").glob("*/*/reweight_seed*/weights.json")):
        pytest.skip("no committed GPT-2 results")
    from experiments.gpt2 import report

    repo = _results_checkout(tmp_path, "results/gpt2")
    w_file = repo / "results/gpt2/instruction_following/main/reweight_seed1/weights.json"
    record = json.loads(w_file.read_text())
    record["weights"] = {k: (0.9 if k == "alpaca" else 0.1 / (len(record["weights"]) - 1)) for k in record["weights"]}
    w_file.write_text(json.dumps(record, indent=2))
    text = report.reproduce(repo / "results" / "gpt2", repo)
    verdicts = {line.split(" | ")[1]: line.rsplit(" | ", 1)[1] for line in text.splitlines() if line.startswith("| ")
                and " | claim | " not in line and not line.startswith("|---")}
    assert verdicts["Alpaca-GPT4 ends with the largest weight"] == "NO LONGER HOLDS |"
    assert verdicts["Spearman(noise rate, weight) ≤ −0.9 in every seed"] == "still holds |"
    assert "s1: alpaca (0.900)" in text and "`instruction_following/main/reweight_seed1/weights.json`" in text
    assert (repo / "results/gpt2/reproduce_report.md").read_text() == text


def test_llama3_offline_claims(tmp_path):
    """experiments/llama3/offline.py's claims on the committed offline results, and on a copy where the learned
    arm's test NLL drops well below uniform's: learned-beats-uniform now holds there, by the seed-spread rule
    (a gap inside the spread over seeds stays a tie)."""
    if not (REPO / "results/llama3/offline/reweight_seed0/weights.json").is_file():
        pytest.skip("no committed offline results")
    import importlib.util

    spec = importlib.util.spec_from_file_location("llama3_offline_r", REPO / "experiments/llama3/offline.py")
    offline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(offline)
    repo = _results_checkout(tmp_path, "results/llama3/offline")
    folder = repo / "results/llama3/offline"
    before = {c.key: c for c in offline.claims(folder)}
    assert before["learned_beats_uniform/llama3_test"].holds is False  # 1.964 vs 1.969: a tie (inside the seed spread)
    assert before["beats_base/llama3_test"].holds is True
    assert before["weights"].holds is None and before["weights"].value.startswith("alpaca 0.204 > ")
    for seed in (0, 1):
        f = folder / f"learned_seed{seed}" / "eval.json"
        ev = json.loads(f.read_text())
        ev["tasks"]["llama3_test"]["nll_per_token"] -= 0.2
        f.write_text(json.dumps(ev))
    text = offline.reproduce(folder, repo)
    row = next(line for line in text.splitlines() if line.startswith("| llama3_test | learned beats uniform"))
    assert row.endswith("| now holds (did not) |")


def test_git_revision_is_dirty_for_code_not_for_published_results(tmp_path):
    """A unit records the revision it ran: results/ and figures/ that runs publish into the checkout do not make it
    "+dirty" (a campaign's pinned checkout publishes there while it runs); a modified tracked file elsewhere does."""
    from scalebio.results import git_revision

    repo = git_checkout(tmp_path / "r", {"src/pkg/x.py": "x = 1\n", "results/a.json": "{}\n",
                                         "figures/f.txt": "f\n", "README.md": "r\n"})
    where = repo / "src" / "pkg"
    clean = git_revision(where)
    assert clean and not clean.endswith("+dirty")
    (repo / "results/a.json").write_text('{"a": 1}\n')
    (repo / "figures/f.txt").write_text("g\n")
    assert git_revision(where) == clean
    (repo / "README.md").write_text("changed\n")
    assert git_revision(where) == clean + "+dirty"
