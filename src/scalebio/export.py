"""`scalebio export RUN_DIR --to FORMAT`: a run's learned weights in the config syntax of another trainer.

What the run learned. ``weights.json`` holds p, one probability per source, on the *example* basis: L2 =
Σ_i p_i · (mean loss of source i's examples), which is what training on examples drawn from source i with
probability p_i optimises (``scalebio resample`` draws exactly that). Trainers read a mixture in other units:

* a probability of the next example (🤗 datasets, LLaMA-Factory, torchtune): example basis, p as is;
* a share of fixed-length token sequences (Megatron-LM / NeMo, nanotron Nanosets, OLMo-core target ratios):
  token basis by default, since their samples are chunks of the concatenated token stream;
* a subsample fraction of each source (axolotl ``weight`` in (0, 1], open-instruct fractions) or a count per
  source (open-instruct): converted from p and the source sizes so that the kept examples are mixed by p.

Token basis, exactly. With e_i examples and t_i tokens of source i in the run (``source_stats`` in
weights.json: after decontamination and truncation, our tokenizer), mean length m_i = t_i / e_i. Drawing
examples by p puts a share q_i = p_i m_i / Σ_j p_j m_j of the tokens on source i; the inverse is
p_i = (q_i / m_i) / Σ_j (q_j / m_j). ``--basis`` picks which one a format is given.

Subsample fractions. Keeping a fraction f_i of source i's n_i examples gives shares f_i n_i / Σ_j f_j n_j;
these equal p_i for f_i = (p_i / n_i) / max_j (p_j / n_j): the source with the largest p_i / n_i is kept whole,
the others are cut, nothing is repeated. ``--total N`` (open-instruct) asks for counts instead: N examples
split by p with largest remainders, repeated where a count exceeds its source.
"""

from __future__ import annotations

import json
import math
import shlex
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import yaml

from .files import write_text
from .weights import load_weights


@dataclass(frozen=True)
class Format:
    name: str
    numbers: str
    """What each exported number means (``--help`` prints it)."""
    basis: str | None
    """Default basis (examples / tokens); None for the subsample formats, where it does not apply."""
    extension: str
    render: Callable[[MixtureExport], dict[str, str]]
    """The text (and companion files) of an export in this format."""


STOPPING = {"first_exhausted": "interleave_under", "all_exhausted": "interleave_over"}
"""datasets' stopping_strategy → LLaMA-Factory's mix_strategy."""


class ExportError(ValueError):
    pass


@dataclass
class Mixture:
    """A run's sources, their example-basis probabilities and (when recorded) what they trained on."""

    names: list[str]
    probabilities: list[float]
    stats: dict[str, dict[str, int]] | None
    example_counts: dict[str, int] | None
    weights_file: Path
    provenance: dict


def load_mixture(run_dir_or_file: str | Path) -> Mixture:
    """The mixture in RUN_DIR/weights.json (or in the weights file given); files older than
    ``source_stats`` load too, and conversions that need the counts then fail with a clear error."""
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = path / "weights.json"
    data = load_weights(path)
    names = list(data["sources"])
    missing = [n for n in names if n not in data["weights"]]
    if missing:
        raise ExportError(f"{path}: field 'weights' has no entry for source {missing[0]!r}")
    probs = [float(data["weights"][n]) for n in names]
    total = sum(probs)
    stats = data.get("source_stats")
    if stats is not None:
        for n in names:
            entry = stats.get(n)
            if not isinstance(entry, dict) or any(not isinstance(entry.get(k), int) or entry[k] < 1
                                                  for k in ("examples", "tokens")):
                raise ExportError(f"{path}: field 'source_stats.{n}' needs positive integer 'examples' and 'tokens'")
    return Mixture(names, [p / total for p in probs], stats, data.get("example_counts"), path,
                   data.get("provenance", {}))


# ---------------------------------------------------------------------------------------------------------
# Conversions (pure functions of the numbers).


def mean_lengths(stats: dict[str, dict[str, int]], names: list[str], field: str = "tokens") -> list[float]:
    """m_i = t_i / e_i, tokens per example of each source."""
    return [stats[n][field] / stats[n]["examples"] for n in names]


def to_token_basis(p: list[float], mean_len: list[float]) -> list[float]:
    """q_i = p_i m_i / Σ_j p_j m_j: the token shares of drawing examples by p."""
    w = [pi * mi for pi, mi in zip(p, mean_len)]
    s = sum(w)
    return [x / s for x in w]


def to_example_basis(q: list[float], mean_len: list[float]) -> list[float]:
    """p_i = (q_i / m_i) / Σ_j (q_j / m_j): the example probabilities whose token shares are q."""
    w = [qi / mi for qi, mi in zip(q, mean_len)]
    s = sum(w)
    return [x / s for x in w]


def subsample_fractions(p: list[float], sizes: list[int]) -> list[float]:
    """f_i = (p_i / n_i) / max_j (p_j / n_j) ∈ (0, 1]: keeping f_i n_i examples of each source mixes them by p."""
    r = [pi / ni for pi, ni in zip(p, sizes)]
    top = max(r)
    return [x / top for x in r]


def apportion(p: list[float], total: int) -> list[int]:
    """``total`` split by p with largest remainders (exact rational arithmetic; ties to the lower index)."""
    exact = [Fraction(pi).limit_denominator(10**12) * total for pi in p]
    s = sum(exact)
    exact = [x * total / s for x in exact]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(p)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


# ---------------------------------------------------------------------------------------------------------
# Rendering.


def parse_pairs(items: list[str] | None, names: list[str], what: str) -> dict[str, str]:
    """``name=value`` items → {name: value}; every name must be a source of the run."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ExportError(f"{what}: {item!r} is not name=value")
        if name not in names:
            raise ExportError(f"{what}: {name!r} is not a source of this run (sources: {', '.join(names)})")
        out[name] = value
    return out


def _number(x: float) -> str:
    """A float written positionally (no exponent), with a '.', reading back to the same float: open-instruct
    reads a number without '.' (such as '1' or '1e-05') as a count."""
    text = np.format_float_positional(float(x), unique=True, trim="0")
    return text if "." in text else text + ".0"


@dataclass(frozen=True)
class Numbers:
    """The numbers one export writes, and how they were derived from the run's p (its header lines)."""

    values: list[float] | list[int]
    """One per source, in the run's order: probabilities, token shares, subsample fractions or example counts."""
    basis: str
    """examples or tokens: what the values are shares of (the subsample formats realise the example mixture)."""
    derivation: list[str]


def need_stats(mix: Mixture, why: str) -> dict[str, dict[str, int]]:
    """The run's per-source counts, or an error saying that ``why`` needs them."""
    if mix.stats is None:
        raise ExportError(f"{mix.weights_file}: no field 'source_stats' (written before scalebio recorded "
                          f"per-source examples and tokens); {why} needs it. Rerun `scalebio reweight` (it "
                          f"resumes from the last checkpoint and rewrites weights.json), or export with "
                          f"--basis examples")
    return mix.stats


def source_sizes(mix: Mixture, given: dict[str, int]) -> list[int]:
    """n_i of every source: ``given`` (--sizes), else the examples the run kept, else its example counts."""
    out = []
    for n in mix.names:
        if n in given:
            out.append(given[n])
        elif mix.stats is not None:
            out.append(mix.stats[n]["examples"])
        elif mix.example_counts and n in mix.example_counts:
            out.append(int(mix.example_counts[n]))
        else:
            raise ExportError(f"{mix.weights_file}: no size for source {n!r} (neither 'source_stats' nor "
                              f"'example_counts'); give --sizes {n}=N")
    bad = [n for n, s in zip(mix.names, out) if s < 1]
    if bad:
        raise ExportError(f"--sizes: source {bad[0]!r} needs a positive size")
    return out


def format_numbers(mix: Mixture, fmt: Format, basis: str | None = None, total: int | None = None,
                   sizes: dict[str, int] | None = None) -> Numbers:
    """What ``fmt`` writes for the run's p: p itself (example basis), the token shares q (token basis), the
    subsample fractions f, or with ``total`` the example counts. A pure function of its arguments."""
    p, names = mix.probabilities, mix.names
    if fmt.basis is None and basis is not None:
        raise ExportError(f"--basis: {fmt.name} takes subsample fractions or counts of examples, which realise "
                          f"the run's example mixture; a basis does not apply")
    lines = ["run mixture (example basis, weights.json): " + ", ".join(f"{n}={_number(x)}" for n, x in zip(names, p))]
    if fmt.basis is None:
        n = source_sizes(mix, sizes or {})
        if total is not None:
            counts = apportion(p, total)
            lines.append(f"counts = {total} examples split by p with largest remainders: "
                         + ", ".join(f"{a}={c}" for a, c in zip(names, counts)))
            over = [a for a, c, s in zip(names, counts, n) if c > s]
            if over:
                lines.append("counts above a source's size repeat its examples (open-instruct upsamples): "
                             + ", ".join(over))
            return Numbers(counts, "examples", lines)
        f = subsample_fractions(p, n)
        lines.append("subsample fraction f_i = (p_i / n_i) / max_j (p_j / n_j), so the kept f_i n_i examples are "
                     "mixed by p; sizes n_i: " + ", ".join(f"{a}={s}" for a, s in zip(names, n)))
        lines.append("kept examples f_i n_i: " + ", ".join(f"{a}={fi * s:.1f}" for a, fi, s in zip(names, f, n)))
        return Numbers(f, "examples", lines)
    basis = basis or fmt.basis
    if basis == "examples":
        lines.append("basis: examples (each number is the probability of the next example; the run's p as is)")
        return Numbers(list(p), basis, lines)
    stats = need_stats(mix, "--basis tokens")
    m = mean_lengths(stats, names)
    q = to_token_basis(p, m)
    lines.append("basis: tokens. q_i = p_i m_i / sum_j p_j m_j, m_i = tokens_i / examples_i of the run "
                 "(after decontamination and truncation, the run's tokenizer); the inverse is "
                 "p_i = (q_i / m_i) / sum_j (q_j / m_j)")
    lines += [f"  {a}: examples={stats[a]['examples']} tokens={stats[a]['tokens']} m={mi:.3f} p={_number(pi)} "
              f"q={_number(qi)}" for a, mi, pi, qi in zip(names, m, p, q)]
    return Numbers(q, basis, lines)


@dataclass(frozen=True)
class MixtureExport:
    """Everything a renderer reads: the run's mixture, the format, a path per source (the source name where
    --paths gave none), the numbers, and the trainer options."""

    mix: Mixture
    fmt: Format
    paths: list[str]
    numbers: Numbers
    stopping: str
    total: int | None
    seed: int
    command: str

    @property
    def names(self) -> list[str]:
        return self.mix.names

    @property
    def values(self) -> list:
        return self.numbers.values


def comments(job: MixtureExport, mark: str = "#") -> str:
    """The header every export opens with: the command, the weights file, what each number means, how it was
    derived."""
    prov = job.mix.provenance
    lines = [f"Written by: {job.command}",
             f"From: {job.mix.weights_file} (step {prov.get('step')}, seed {prov.get('seed')}, "
             f"config digest {prov.get('config_digest')})",
             f"Each number ({job.fmt.name}): {job.fmt.numbers}."]
    lines += job.numbers.derivation
    if any(p == n for p, n in zip(job.paths, job.names)):
        lines.append("paths: source names stand in where --paths gave none")
    return "".join(f"{mark} {line}\n" for line in lines)


def _yaml(data) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)


# Renderers: MixtureExport → {suffix: text}; "" is the main output, other suffixes are companion files beside --out.


def render_hf(job: MixtureExport) -> dict[str, str]:
    mixture = {"sources": job.names, "paths": job.paths, "probabilities": job.values,
               "stopping_strategy": job.stopping, "seed": job.seed, "basis": job.numbers.basis}
    text = (comments(job) + "import json\n\nimport datasets\n\n"
            "# --- mixture (JSON) ---\n"
            f"MIXTURE = json.loads(r'''{json.dumps(mixture, indent=2, ensure_ascii=False)}''')\n"
            "# --- end mixture ---\n\n\n"
            "def mix(sources):\n"
            "    \"\"\"The datasets of MIXTURE['paths'], in that order, interleaved by its probabilities.\"\"\"\n"
            "    return datasets.interleave_datasets(list(sources), probabilities=MIXTURE['probabilities'],\n"
            "                                        seed=MIXTURE['seed'], stopping_strategy=MIXTURE['stopping_strategy'])\n\n\n"
            "if __name__ == '__main__':\n"
            "    mixed = mix(datasets.load_dataset('json', data_files=p, split='train') for p in MIXTURE['paths'])\n"
            "    print(mixed)\n")
    return {"": text}


def render_llamafactory(job: MixtureExport) -> dict[str, str]:
    bad = [p for p in job.paths if "," in p]
    if bad:
        raise ExportError(f"--paths: LLaMA-Factory's `dataset:` is comma-separated, so {bad[0]!r} cannot be a name")
    data = {"dataset": ",".join(job.paths), "mix_strategy": STOPPING[job.stopping],
            "interleave_probs": ",".join(_number(x) for x in job.values)}
    note = ("# `dataset:` names are entries of your dataset_dir/dataset_info.json (for a local file: "
            "{\"NAME\": {\"file_name\": \"PATH\"}}).\n"
            f"# mix_strategy {STOPPING[job.stopping]} = datasets stopping_strategy {job.stopping}.\n")
    return {"": comments(job) + note + _yaml(data)}


def render_megatron(job: MixtureExport) -> dict[str, str]:
    bad = [p for p in job.paths if not p or any(c.isspace() for c in p)]
    if bad:
        raise ExportError(f"--paths: Megatron splits --data-path and the --data-args-path file on whitespace, so "
                          f"the prefix {bad[0]!r} cannot be used")
    pairs = [(_number(w), p) for w, p in zip(job.values, job.paths)]
    words = " ".join(f"{w} {shlex.quote(p)}" for w, p in pairs)  # quoted for the shell (e.g. '$')
    note = ("# Megatron normalises the weights and draws that share of its training samples from each prefix\n"
            "# (samples, not dataset sizes: a small prefix is repeated to reach its share).\n"
            "# Use:  pretrain_gpt.py ... --data-path \"${DATA_PATH[@]}\"\n"
            "# or:   pretrain_gpt.py ... --data-args-path FILE, FILE holding the same \"weight prefix\" pairs\n"
            "#       (written beside --out as *.data_args.txt).\n")
    data_args = "".join(f"{w} {p}\n" for w, p in pairs)
    return {"": comments(job) + note + f"DATA_PATH=({words})\n", ".data_args.txt": data_args}


def render_torchtune(job: MixtureExport) -> dict[str, str]:
    children = [{"_component_": "torchtune.datasets.HfIterableDataset", "path": "json", "data_files": p,
                 "split": "train", "dataset_name": n, "weight": w}
                for n, p, w in zip(job.names, job.paths, job.values)]
    data = {"dataset": {"_component_": "torchtune.datasets.InterleavedDataset", "seed": job.seed,
                        "datasets": children}}
    note = ("# InterleavedDataset normalises the children's weights and draws the next example's source with them.\n"
            "# Add each child's message_transform / model_transform as for any HfIterableDataset. Releases whose\n"
            "# InterleavedDataset takes a `weights:` list instead: weights: ["
            + ", ".join(_number(w) for w in job.values) + "]\n")
    return {"": comments(job) + note + _yaml(data)}


def render_nanotron(job: MixtureExport) -> dict[str, str]:
    data = {"data_stages": [{"name": "scalebio mixture", "start_training_step": 1, "data": {
        "dataset": {"dataset_path": dict(zip(job.paths, job.values))}, "num_loading_workers": 1,
        "seed": job.seed}}]}
    note = ("# Nanosets: paths are pre-tokenized *_input_ids.npy files; each epoch holds that share of its samples\n"
            "# (sequence_length tokens each) from each. Releases with dataset_folder / dataset_weights take the same\n"
            "# numbers in the same order: dataset_weights: [" + ", ".join(_number(w) for w in job.values) + "]\n")
    return {"": comments(job) + note + _yaml(data)}


def render_olmo(job: MixtureExport) -> dict[str, str]:
    reps = [1.0] * len(job.names)
    lines = []
    if job.total is not None:
        stats = need_stats(job.mix, "max_repetition_ratio from --total")
        reps = [max(1.0, q * job.total / stats[n]["tokens"]) for n, q in zip(job.names, job.values)]
        lines.append(f"# requested_tokens = {job.total}; max_repetition_ratio = max(1, target_ratio * "
                     f"requested_tokens / tokens of the source in the run): an estimate, OLMo-core counts its own "
                     f"tokens\n")
    else:
        lines.append("# max_repetition_ratio 1.0: no repetition; give --total REQUESTED_TOKENS to size it\n")
    srcs = "".join(f"        SourceMixtureConfig(source_name={json.dumps(n)}, target_ratio={_number(q)},\n"
                   f"                            paths=[{json.dumps(p)}], max_repetition_ratio={_number(r)}),\n"
                   for n, p, q, r in zip(job.names, job.paths, job.values, reps))
    text = (comments(job) + "".join(lines)
            + "# Pass SOURCES as SourceMixtureDatasetConfig(source_list=SOURCES, requested_tokens=..., "
              "global_batch_size=...)\n"
              "# (older releases: source_configs=SOURCES.sources).\n"
              "from olmo_core.data.source_mixture import SourceMixtureConfig, SourceMixtureList\n\n"
              "SOURCES = SourceMixtureList(\n    sources=[\n" + srcs + "    ]\n)\n")
    return {"": text}


def render_axolotl(job: MixtureExport) -> dict[str, str]:
    data = {"datasets": [{"path": p, "weight": w} for p, w in zip(job.paths, job.values)]}
    note = ("# axolotl keeps a random `weight` fraction of each dataset before tokenization, then concatenates.\n"
            "# The fractions assume the sizes above: give --sizes name=N if axolotl loads other files.\n"
            "# Add each dataset's `type:` (alpaca, chat_template, completion, ...) as usual.\n")
    return {"": comments(job) + note + _yaml(data)}


def render_open_instruct(job: MixtureExport) -> dict[str, str]:
    if job.total is not None:
        values = [str(int(c)) for c in job.values]
        note = "# Integers are example counts (open-instruct repeats examples when a count exceeds the dataset).\n"
    else:
        values = [_number(f) for f in job.values]
        note = "# Numbers with a '.' are fractions of each dataset (open-instruct reads '1' as a count).\n"
    mixer_list = " ".join(f"{shlex.quote(p)} {v}" for p, v in zip(job.paths, values))
    note += f"# Command line: --dataset_mixer_list {mixer_list}\n"
    data = {"dataset_mixer": {p: (int(v) if job.total is not None else float(v)) for p, v in zip(job.paths, values)}}
    return {"": comments(job) + note + _yaml(data)}


# ---------------------------------------------------------------------------------------------------------
# The formats: a new trainer is a renderer above and one entry here.


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("hf", "probability that the next example comes from the source (datasets.interleave_datasets "
                 "probabilities); a Python snippet with the mixture as JSON", "examples", ".py", render_hf),
    Format("llamafactory", "interleave_probs: probability of the next example, in `dataset:` order, with "
                           "mix_strategy interleave_under / interleave_over", "examples", ".yaml",
           render_llamafactory),
    Format("megatron", "--data-path w1 prefix1 w2 prefix2 ...: share of the training samples (fixed-length token "
                       "sequences) drawn from each prefix, normalised by Megatron; plus the --data-args-path file",
           "tokens", ".sh", render_megatron),
    Format("torchtune", "InterleavedDataset: each child's weight, the probability of the next example",
           "examples", ".yaml", render_torchtune),
    Format("nanotron", "dataset_path: {path: weight}: share of each epoch's samples (token sequences) from "
                       "each pre-tokenized dataset", "tokens", ".yaml", render_nanotron),
    Format("olmo", "OLMo-core SourceMixtureConfig target_ratio: share of the mixture's tokens (sums to 1), with "
                   "max_repetition_ratio from --total", "tokens", ".py", render_olmo),
    Format("axolotl", "per-dataset weight in (0, 1]: the fraction of that dataset kept (a subsample), computed "
                      "from p and the source sizes so the kept examples are mixed by p", None, ".yaml",
           render_axolotl),
    Format("open-instruct", "dataset_mixer: fraction of each dataset kept (like axolotl), or with --total N the "
                            "number of examples of each", None, ".yaml", render_open_instruct),
]}


def export(run_dir_or_file: str | Path, fmt: str, paths: dict[str, str] | None = None, basis: str | None = None,
           stopping: str = "first_exhausted", total: int | None = None, sizes: dict[str, int] | None = None,
           seed: int = 0, command: str | None = None) -> dict[str, str]:
    """The export of a run's weights as {suffix: text} ("" is the main text; megatron adds ".data_args.txt")."""
    if fmt not in FORMATS:
        raise ExportError(f"--to: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if basis not in (None, "examples", "tokens"):
        raise ExportError(f"--basis: {basis!r} is not examples or tokens")
    if stopping not in STOPPING:
        raise ExportError(f"--stopping: {stopping!r} is not one of {', '.join(STOPPING)}")
    if total is not None and fmt not in ("open-instruct", "olmo"):
        raise ExportError(f"--total: only open-instruct (example counts) and olmo (requested tokens) use it, not {fmt}")
    if total is not None and total < 1:
        raise ExportError(f"--total: must be positive, got {total}")
    mix = load_mixture(run_dir_or_file)
    paths = dict(paths or {})
    unknown = [n for n in paths if n not in mix.names]
    if unknown:
        raise ExportError(f"--paths: {unknown[0]!r} is not a source of {mix.weights_file}")
    command = command or f"scalebio export {run_dir_or_file} --to {fmt}"
    numbers = format_numbers(mix, FORMATS[fmt], basis, total, sizes)
    paths_in_order = [paths.get(n, n) for n in mix.names]
    return FORMATS[fmt].render(MixtureExport(mix, FORMATS[fmt], paths_in_order, numbers, stopping, total, seed, command))


def write_export(outputs: dict[str, str], out: str | Path | None) -> list[Path]:
    """Write the main text to ``out`` and companions beside it (``out`` minus its suffix + the companion's);
    without ``out`` return [] (the caller prints the main text)."""
    if out is None:
        return []
    out = Path(out)
    written = []
    for suffix, text in outputs.items():
        path = out if suffix == "" else out.with_name(out.stem + suffix)
        write_text(path, text)
        written.append(path)
    return written


def help_epilog() -> str:
    lines = ["formats (what each number means; default basis):"]
    for f in FORMATS.values():
        lines += textwrap.wrap(f"{f.name:<14} {f.numbers} [default basis: {f.basis or 'none, a subsample'}]",
                               width=110, initial_indent="  ", subsequent_indent=" " * 17)
    lines += ["",
              "weights.json's p is on the example basis (the probability of drawing an example of each source).",
              "--basis tokens gives q_i = p_i m_i / sum_j p_j m_j (m_i = tokens / examples of source i in the run,",
              "from weights.json's source_stats); --basis examples gives p itself. Both are exact given the counts."]
    return "\n".join(lines)
