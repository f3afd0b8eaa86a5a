"""A tiny run killed (os._exit through SCALEBIO_KILL_AT) at many exact moments, each time restarted with the same
command, ends with the final weights and parameters of one uninterrupted run, bit for bit, and byte-identical
metrics.jsonl / weights.jsonl."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_run_config
from scalebio.config import load_config
from scalebio.results import KILL_EXIT_CODE
from scalebio.reweight import run_reweight

KILLS = [  # one after the other, in the same run directory
    "tokenizer.tmp_created:1", "tokenizer.written:1", "write.config.yaml:1", "write.meta.json:1",
    "checkpoint.tmp_created:1", "checkpoint.writing:3", "checkpoint.tmp_written:1", "log.mid_line:3",
    "checkpoint.replaced:1", "log.between:1", "step.end:2", "write.weights.json:1",
]


def _final(run: Path):
    ckpt = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
    return torch.load(ckpt, weights_only=False)["solver"]


@pytest.mark.slow
def test_killed_at_every_moment_resumes_bit_identically(tmp_path):
    over = dict(solver={"steps": 6}, checkpoint_every=2, threads=1)
    ref_cfg = load_config(tiny_run_config(tmp_path / "ref", **over))
    ref = run_reweight(ref_cfg, progress=False)
    path = tiny_run_config(tmp_path / "k", **over)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    code = f"from scalebio.cli import main; import sys; sys.exit(main(['reweight', {str(path)!r}, '--no-progress']))"
    for point in KILLS:
        env["SCALEBIO_KILL_AT"] = point
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == KILL_EXIT_CODE, (point, r.returncode, r.stderr[-2000:])
    resumed = run_reweight(load_config(path), progress=False)
    run, ref_run = tmp_path / "k" / "run", Path(ref_cfg.run_dir)
    assert resumed["lambda"] == ref["lambda"] and resumed["weights"] == ref["weights"]
    for name in ("metrics.jsonl", "weights.jsonl"):
        assert (run / name).read_bytes() == (ref_run / name).read_bytes(), name
    a, b = _final(run), _final(ref_run)
    for key in ("u", "w"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key]), key
    assert not list(run.rglob(".*.tmp"))
