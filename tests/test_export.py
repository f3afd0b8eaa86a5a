"""`scalebio export`: every format reads back to the run's mixture, in the units that trainer uses.

The read-back code here is independent of scalebio.export: it parses each output the way its trainer reads it
(YAML, JSON, a shell word list, a Python AST) and recomputes the expected numbers from the counts directly.
"""

import ast
import json
import re
import shlex
from collections import Counter

import pytest
import torch
import yaml

from scalebio import export as ex
from scalebio.cli import main
from scalebio.data import Example
from scalebio.weights import example_stats, weights_record, write_weights

NAMES = ["math", "chat", "code"]
P = [0.51234567891, 0.28765432109, 0.2]  # not short decimals, so a rounded export cannot pass
# Uneven on purpose: sizes 10,000 / 4,000 / 100,000 examples; mean lengths 50, 200, 20 tokens.
STATS = {"math": {"examples": 10_000, "tokens": 500_000, "response_tokens": 200_000},
         "chat": {"examples": 4_000, "tokens": 800_000, "response_tokens": 300_000},
         "code": {"examples": 100_000, "tokens": 2_000_000, "response_tokens": 900_000}}
PATHS = {"math": "/data/math train.jsonl", "chat": "/data/chat.jsonl", "code": "/data/code.jsonl"}


def write_run(tmp_path, stats=STATS, p=P):
    lam = torch.log(torch.tensor(p, dtype=torch.float64))
    counts = {n: s["examples"] for n, s in stats.items()} if stats else {n: 1000 for n in NAMES}
    record = weights_record(NAMES, lam, counts, {"step": 7, "seed": 0}, source_stats=stats)
    run = tmp_path / "run"
    write_weights(run / "weights.json", record)
    return run


def token_shares(p):
    """Expected token shares when drawing examples by p, straight from the counts."""
    tokens = [p[i] * STATS[n]["tokens"] / STATS[n]["examples"] for i, n in enumerate(NAMES)]
    return [t / sum(tokens) for t in tokens]


def normalised(values):
    s = sum(values)
    return [v / s for v in values]


# -- read-back, one per trainer ----------------------------------------------------------------------------

def read_hf(outputs):
    text = outputs[""]
    ast.parse(text)
    block = re.search(r"json\.loads\(r'''(.*?)'''\)", text, re.S).group(1)
    mix = json.loads(block)
    return mix["paths"], mix["probabilities"]


def read_llamafactory(outputs):
    cfg = yaml.safe_load(outputs[""])
    assert cfg["mix_strategy"] in ("interleave_under", "interleave_over")
    return cfg["dataset"].split(","), [float(x) for x in cfg["interleave_probs"].split(",")]


def read_megatron(outputs):
    line = next(x for x in outputs[""].splitlines() if x.startswith("DATA_PATH=("))
    words = shlex.split(line[len("DATA_PATH=("):-1])
    weights, prefixes = [float(w) for w in words[0::2]], words[1::2]
    file_words = outputs[".data_args.txt"].split()  # Megatron splits the --data-args-path file on whitespace
    assert [float(w) for w in file_words[0::2]] == weights and file_words[1::2] == prefixes
    return prefixes, normalised(weights)


def read_torchtune(outputs):
    cfg = yaml.safe_load(outputs[""])["dataset"]
    assert cfg["_component_"] == "torchtune.datasets.InterleavedDataset"
    children = cfg["datasets"]
    return [c["data_files"] for c in children], normalised([c["weight"] for c in children])


def read_nanotron(outputs):
    stage = yaml.safe_load(outputs[""])["data_stages"][0]
    paths = stage["data"]["dataset"]["dataset_path"]
    return list(paths), normalised(list(paths.values()))


def read_olmo(outputs):
    tree = ast.parse(outputs[""])
    paths, ratios = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "SourceMixtureConfig":
            kw = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            paths.append(kw["paths"][0])
            ratios.append(kw["target_ratio"])
            assert kw["max_repetition_ratio"] >= 1.0
    assert abs(sum(ratios) - 1) < 1e-12  # OLMo-core requires target ratios summing to 1
    return paths, ratios


def read_axolotl(outputs):
    cfg = yaml.safe_load(outputs[""])["datasets"]
    return [d["path"] for d in cfg], [d["weight"] for d in cfg]


def read_open_instruct(outputs):
    mixer = yaml.safe_load(outputs[""])["dataset_mixer"]
    cli = re.search(r"--dataset_mixer_list (.*)", outputs[""]).group(1)
    words = shlex.split(cli)
    assert dict(zip(words[0::2], [float(w) if "." in w else int(w) for w in words[1::2]])) == mixer
    return list(mixer), list(mixer.values())


READERS = {"hf": read_hf, "llamafactory": read_llamafactory, "megatron": read_megatron, "torchtune": read_torchtune,
           "nanotron": read_nanotron, "olmo": read_olmo, "axolotl": read_axolotl, "open-instruct": read_open_instruct}


def expected(fmt, basis=None):
    sizes = [STATS[n]["examples"] for n in NAMES]
    if fmt in ("axolotl", "open-instruct"):
        return None  # fractions: checked through the shares they produce
    basis = basis or {"megatron": "tokens", "nanotron": "tokens", "olmo": "tokens"}.get(fmt, "examples")
    return P if basis == "examples" else token_shares(P)


@pytest.mark.parametrize("fmt", list(READERS))
def test_each_export_reads_back_to_the_mixture(tmp_path, fmt):
    run = write_run(tmp_path)
    paths = {"llamafactory": {n: f"{n}_sft" for n in NAMES},  # dataset_info.json names
             "megatron": {n: f"/d/{n}_text_document" for n in NAMES}}.get(fmt, PATHS)
    names = [paths[n] for n in NAMES]
    outputs = ex.export(run, fmt, paths)
    got_paths, values = READERS[fmt](outputs)
    assert got_paths == names
    assert outputs[""].startswith("# Written by: ")
    want = expected(fmt)
    if want is None:  # subsample fractions: kept f_i n_i examples must be mixed by P, the largest kept whole
        kept = [f * STATS[n]["examples"] for f, n in zip(values, NAMES)]
        assert normalised(kept) == pytest.approx(P, abs=1e-9)
        assert max(values) == 1.0 and all(0 < f <= 1 for f in values)
    else:
        assert values == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("fmt", ["hf", "megatron", "torchtune", "nanotron", "olmo", "llamafactory"])
@pytest.mark.parametrize("basis", ["examples", "tokens"])
def test_basis_flag_sets_the_units(tmp_path, fmt, basis):
    outputs = ex.export(write_run(tmp_path), fmt, basis=basis)
    _, values = READERS[fmt](outputs)
    assert values == pytest.approx(expected(fmt, basis), abs=1e-9)
    if basis == "tokens":
        assert "q_i = p_i m_i / sum_j p_j m_j" in outputs[""]  # the conversion is stated in the output


def test_hf_export_drives_interleave_datasets(tmp_path):
    """Run the exported snippet's own mix() on in-memory datasets: 20,000 draws land within 1% of the weights."""
    import datasets

    text = ex.export(write_run(tmp_path), "hf")[""]
    module = {"__name__": "exported"}
    exec(compile(text, "exported_hf.py", "exec"), module)
    sources = [datasets.Dataset.from_dict({"source": [n] * 20_000}) for n in NAMES]
    mixed = module["mix"](sources)
    assert len(mixed) >= 20_000
    counts = Counter(mixed.select(range(20_000))["source"])
    for n, p in zip(NAMES, P):
        assert abs(counts[n] / 20_000 - p) < 0.01, (n, counts[n])


def test_axolotl_fractions_give_the_mixture_on_uneven_sources(tmp_path):
    """Subsample each dataset as axolotl does (shuffle, keep int(weight × size)) and concatenate."""
    import datasets

    sizes = {"math": 10_000, "chat": 4_000, "code": 100_000}
    outputs = ex.export(write_run(tmp_path), "axolotl", PATHS)
    cfg = yaml.safe_load(outputs[""])["datasets"]
    parts = []
    for n, d in zip(NAMES, cfg):
        full = datasets.Dataset.from_dict({"source": [n] * sizes[n]})
        parts.append(full.shuffle(seed=0).select(range(int(d["weight"] * len(full)))))
    mixed = datasets.concatenate_datasets(parts)
    shares = Counter(mixed["source"])
    for n, p in zip(NAMES, P):
        assert abs(shares[n] / len(mixed) - p) < 1e-3, (n, shares[n], len(mixed))
    # chat has the largest p / n, so it is kept whole and nothing is repeated.
    assert shares["chat"] == sizes["chat"]
    # The plain weights as fractions would not: code (the largest source) would dominate.
    naive = Counter({n: int(p * sizes[n]) for n, p in zip(NAMES, P)})
    assert naive["code"] / sum(naive.values()) > 0.5


def test_sizes_override_and_open_instruct_counts(tmp_path):
    run = write_run(tmp_path, p=[0.5, 0.3, 0.2])
    outputs = ex.export(run, "axolotl", sizes={"math": 100, "chat": 100, "code": 100})
    _, fractions = read_axolotl(outputs)
    assert fractions == pytest.approx([1.0, 0.6, 0.4], abs=1e-12)
    outputs = ex.export(run, "open-instruct", total=1001)
    _, counts = read_open_instruct(outputs)
    assert all(isinstance(c, int) for c in counts) and sum(counts) == 1001
    assert counts == [501, 300, 200]  # 500.5 / 300.3 / 200.2: the largest remainder gets the extra one


def test_tiny_fractions_stay_fractions_for_open_instruct(tmp_path):
    run = write_run(tmp_path, p=[0.99998, 0.00001, 0.00001])
    outputs = ex.export(run, "open-instruct", sizes={"math": 1, "chat": 1, "code": 1})
    words = shlex.split(re.search(r"--dataset_mixer_list (.*)", outputs[""]).group(1))
    assert all("." in w and "e" not in w for w in words[1::2])  # '1e-05' would read as a count
    _, fractions = read_open_instruct(outputs)
    assert fractions == pytest.approx([1.0, 0.00001 / 0.99998, 0.00001 / 0.99998], rel=1e-9)


def test_basis_conversion_round_trips_and_matches_the_counts():
    m = ex.mean_lengths(STATS, NAMES)
    assert m == [50.0, 200.0, 20.0]
    q = ex.to_token_basis(P, m)
    assert q == pytest.approx(token_shares(P), abs=1e-12)
    assert ex.to_example_basis(q, m) == pytest.approx(P, abs=1e-12)
    # Drawing N examples by p gives N p_i m_i tokens per source: q is exactly those shares.
    n = 1_000_000
    tokens = [n * p * mi for p, mi in zip(P, m)]
    assert normalised(tokens) == pytest.approx(q, abs=1e-12)
    other = [0.1, 0.7, 0.2]
    assert ex.to_token_basis(ex.to_example_basis(other, m), m) == pytest.approx(other, abs=1e-12)


def test_old_weights_file_without_source_stats(tmp_path):
    run = write_run(tmp_path, stats=None)
    assert "source_stats" not in json.loads((run / "weights.json").read_text())
    _, values = read_hf(ex.export(run, "hf"))
    assert values == pytest.approx(P, abs=1e-9)
    _, values = read_megatron(ex.export(run, "megatron", basis="examples"))
    assert values == pytest.approx(P, abs=1e-9)
    with pytest.raises(ex.ExportError, match=r"weights\.json: no field 'source_stats'.*--basis tokens"):
        ex.export(run, "megatron")
    _, fractions = read_axolotl(ex.export(run, "axolotl"))  # sizes from example_counts (1000 each)
    assert fractions == pytest.approx([p / P[0] for p in P], abs=1e-12)


def test_bad_arguments_name_the_flag(tmp_path):
    run = write_run(tmp_path)
    with pytest.raises(ex.ExportError, match=r"--paths: 'nope' is not a source"):
        ex.export(run, "hf", {"nope": "/x"})
    with pytest.raises(ex.ExportError, match=r"--basis: axolotl"):
        ex.export(run, "axolotl", basis="tokens")
    with pytest.raises(ex.ExportError, match=r"--total: only"):
        ex.export(run, "megatron", total=10)
    with pytest.raises(ex.ExportError, match=r"--paths: Megatron splits .* 'a b'"):
        ex.export(run, "megatron", {"math": "a b"})
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        ex.export(tmp_path / "missing", "hf")


def test_cli_writes_megatron_files_and_reports_errors(tmp_path, capsys):
    run = write_run(tmp_path)
    out = tmp_path / "blend.sh"
    assert main(["export", str(run), "--to", "megatron", "--paths", "math=/d/math_text_document",
                 "chat=/d/chat_text_document", "--out", str(out)]) == 0
    files = {"": out.read_text(), ".data_args.txt": (tmp_path / "blend.data_args.txt").read_text()}
    prefixes, values = read_megatron(files)
    assert prefixes == ["/d/math_text_document", "/d/chat_text_document", "code"]
    assert values == pytest.approx(token_shares(P), abs=1e-9)
    assert main(["export", str(run), "--to", "hf"]) == 0
    assert "interleave_datasets" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    help_text = capsys.readouterr().out
    assert all(f in help_text for f in ex.FORMATS) and "q_i = p_i m_i / sum_j p_j m_j" in help_text
    assert main(["export", str(run), "--to", "hf", "--paths", "bogus=/x"]) == 1
    assert main(["export", str(run), "--to", "axolotl", "--sizes", "math=many"]) == 1


def test_example_stats_count_what_training_sees():
    examples = [Example([1, 2, 3, 4], [-100, -100, 3, 4], 0), Example([5, 6], [5, 6], 0)]
    # position 0 is never predicted, so its label does not count as a response token
    assert example_stats(examples) == {"examples": 2, "tokens": 6, "response_tokens": 3}


def test_reweight_records_source_stats(tmp_path):
    from conftest import tiny_run_config
    from scalebio.config import load_config
    from scalebio.reweight import Reweighting

    cfg = load_config(tiny_run_config(tmp_path, solver={"steps": 1}))
    rw = Reweighting(cfg)
    record = rw.run_loop(progress=False)
    stats = record["source_stats"]
    for s in rw.sources:
        assert stats[s.name]["examples"] == len(s.examples) == record["example_counts"][s.name]
        assert stats[s.name]["tokens"] == sum(len(e.input_ids) for e in s.examples)
        assert 0 < stats[s.name]["response_tokens"] < stats[s.name]["tokens"]
    assert json.loads((tmp_path / "run" / "weights.json").read_text())["source_stats"] == stats
    # and the export reads it: megatron's token basis works on a real run
    _, values = read_megatron(ex.export(tmp_path / "run", "megatron"))
    assert abs(sum(values) - 1) < 1e-12
