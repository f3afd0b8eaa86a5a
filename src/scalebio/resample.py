"""Draw a fine-tuning set of N examples from a pool of sources by learned (or uniform) weights.

Each draw picks a source with probability p_i from a seeded generator, then that source's next example from
a seeded permutation: without replacement inside a source while it lasts, reshuffled only once it is used up.
The output records which weights file produced it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .results import write_text
from .files import file_sha256
from .weights import load_weights

log = logging.getLogger(__name__)


def draw_counts_and_order(probabilities: list[float], sizes: list[int], n: int, seed: int) -> list[tuple[int, int]]:
    """N (source, index) pairs. probabilities [k] (sum 1), sizes [k] → list of length n."""
    rng = np.random.default_rng(seed)
    choices = rng.choice(len(probabilities), size=n, p=np.asarray(probabilities, dtype=float))
    perms = [rng.permutation(s) for s in sizes]
    cursor = [0] * len(sizes)
    out = []
    for c in choices:
        c = int(c)
        if sizes[c] == 0:
            raise ValueError(f"source {c} is empty but has weight {probabilities[c]}")
        if cursor[c] == sizes[c]:  # used up: start a fresh permutation (only then does an example repeat)
            perms[c] = rng.permutation(sizes[c])
            cursor[c] = 0
        out.append((c, int(perms[c][cursor[c]])))
        cursor[c] += 1
    return out


def resample(weights_file: str | Path | None, sources: dict[str, list[dict]], n: int, seed: int,
             out: str | Path, replace: bool = False) -> dict:
    """Write ``out`` (JSONL; each record gains a ``source`` field) and ``out`` + ``.manifest.json``.

    ``weights_file`` None means uniform weights (the baseline). ``sources`` maps source name → records; the
    weights file must name exactly these sources. ``n`` larger than the pool is refused unless ``replace``
    (records then repeat). The manifest counts, per source, the draws that repeat a record (``repeated``).
    Both files are written atomically; the old manifest is removed first, so an output never sits beside a
    manifest of another draw.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--n: {n!r}: the number of examples to draw must be an integer >= 1")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out: {out} is a directory; give the JSONL file to write (e.g. {out / 'train.jsonl'})")
    names = list(sources)
    if weights_file is None:
        probs = [1.0 / len(names)] * len(names)
        origin = {"weights_file": None, "weights": "uniform"}
    else:
        data = load_weights(weights_file)
        extra = [s for s in data["sources"] if s not in sources]
        if extra:
            what = (f"source {extra[0]!r} has a weight but no data was given for it" if len(extra) == 1 else
                    f"sources {', '.join(map(repr, extra))} have a weight but no data was given for them")
            raise ValueError(f"{weights_file}: {what} (pool: {', '.join(names)})")
        missing = [s for s in names if s not in data["sources"] or s not in data["weights"]]
        if missing:
            raise ValueError(f"{weights_file}: no weight for pool source(s) {', '.join(map(repr, missing))}; the "
                             f"weights must cover every source of the pool ({', '.join(names)})")
        names = list(data["sources"])
        probs = [data["weights"][s] for s in names]
        origin = {"weights_file": str(weights_file), "weights_sha256": file_sha256(Path(weights_file)),
                  "weights": dict(zip(names, probs))}
    sizes = [len(sources[s]) for s in names]
    if n > sum(sizes) and not replace:
        raise ValueError(f"--n: {n} is larger than the pool ({sum(sizes)} examples: "
                         f"{', '.join(f'{s} {k}' for s, k in zip(names, sizes))}), so records would repeat; "
                         f"pass --replace to allow repeats, or lower --n")
    picks = draw_counts_and_order(probs, sizes, n, seed)
    lines = [json.dumps({**sources[names[c]][i], "source": names[c]}, ensure_ascii=False) + "\n" for c, i in picks]
    manifest_path = out.with_name(out.name + ".manifest.json")
    manifest_path.unlink(missing_ok=True)
    write_text(out, "".join(lines))
    counts = {s: 0 for s in names}
    for c, _ in picks:
        counts[names[c]] += 1
    repeated = {s: max(0, counts[s] - size) for s, size in zip(names, sizes)}
    if any(repeated.values()):
        log.warning("resample: some records repeat (a source drawn more often than it has records): %s",
                    {s: r for s, r in repeated.items() if r})
    manifest = {**origin, "n": n, "seed": seed, "replace": replace, "counts": counts, "repeated": repeated,
                "pool_sizes": dict(zip(names, sizes)), "output": out.name, "output_sha256": file_sha256(out)}
    write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return manifest


def pool_from_run(run_dir: str | Path) -> dict[str, list[dict]]:
    """The training sources of a reweighting run, read and decontaminated as the run did (same files, same
    held-out prompts), as name → records."""
    import yaml

    from . import data as data_mod
    from .config import RunConfig, from_dict

    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{run_dir}: not a reweighting run directory (not a directory)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a reweighting run directory (no config.yaml)")
    cfg = from_dict(RunConfig, yaml.safe_load(path.read_text()))
    def checked(src) -> tuple[list[dict], str]:  # a bad record is named by file and line, as the run named it
        records, fmt = data_mod.load_with_format(src, cfg)
        label = src.path or f"{src.hub_dataset} (split {src.split})"
        for i, rec in enumerate(records):
            data_mod.check_record(rec, fmt, data_mod.locate(records, i, label))
        return records, fmt

    held_out = set()
    if cfg.data.decontaminate:
        for src in [cfg.data.validation, *cfg.data.decontaminate_against]:
            records, fmt = checked(src)
            held_out.update(data_mod.prompt_key(r, fmt) for r in records)
    pool = {}
    for src in cfg.data.sources:
        records, fmt = checked(src)
        pool[src.name] = [r for r in records if data_mod.prompt_key(r, fmt) not in held_out]
    return pool
