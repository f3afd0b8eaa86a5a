"""Evaluation tasks of the large-model experiment, and a command that runs them on one model.

    python experiments/llama3/tasks.py --model MODEL_DIR --out results/llama3/<preset>/<method>_seed<s>/eval.json
        [--online] [--gguf-file NAME] [--loglik-limit N] [--em-limit N] [--max-gen-toks N] [--mt-bench] [--samples]

Offline tasks (local files from ../shared/data, lm-eval task dicts built by scalebio.evaluation):

    llama3_test         the authors' test.json (280, mixed math / general / code): response log-likelihood
    gsm8k_test_loglik   GSM8K test: log-likelihood of the reference solution (question → instruction)
    math_test_loglik    MATH test: log-likelihood of the reference solution (problem → instruction)
    gsm8k_exact_match   GSM8K test, first --em-limit questions: greedy generation, exact match of the final number
    mt_bench_reference_loglik   (--mt-bench) MT-Bench's GPT-4 reference answers (30 math / reasoning / coding
                        questions): log-likelihood of the first-turn reference answer (first turn → instruction)

``--online`` adds the standard lm-eval tasks (ONLINE_TASKS; they download their data, so they need a network).
``evaluate_model`` runs them on a model in memory (offline.py, protocol.py). MT-Bench is mt_bench.py. Results go
to ``eval.json`` in scalebio.evaluation's compact format
``{"tasks": {task: {metric: value}}, ...}``, which table1.py reads; ``--samples`` adds the per-document
``eval_samples.jsonl`` beside it (scalebio.evaluation.record) for table1.py's confidence intervals.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from scalebio.data import read_records
from scalebio.evaluation import (evaluate, exact_match_task, load_model, response_loglik_task,
                                 write_task_yaml)
from scalebio.files import write_text

REPO = Path(__file__).resolve().parents[2]

log = logging.getLogger("llama3.tasks")

SHARED_DATA = REPO.parent / "shared" / "data"
ONLINE_TASKS = ["mmlu", "arc_challenge", "hellaswag", "truthfulqa_mc2", "gsm8k"]
"""Standard lm-eval tasks for users with a network (Open LLM Leaderboard style)."""


def questions_to_alpaca(src: str | Path, out: str | Path, question_field: str, answer_field: str) -> Path:
    """GSM8K / MATH records → Alpaca JSONL (question → instruction, answer or solution → output, empty input)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"instruction": r[question_field], "input": "", "output": r[answer_field]}, ensure_ascii=False)
             for r in read_records(Path(src))]
    write_text(out, "\n".join(lines) + "\n")
    return out


def mt_bench_references_to_alpaca(mt_bench: str | Path, out: str | Path) -> Path:
    """MT-Bench reference answers → Alpaca JSONL: a question's first turn → instruction, the first turn of its
    reference answer (``reference_answer/*.jsonl``, files and question ids in sorted order) → output."""
    mt_bench, out = Path(mt_bench), Path(out)
    questions = {q["question_id"]: q for q in read_records(mt_bench / "question.jsonl")}
    answers = [a for path in sorted((mt_bench / "reference_answer").glob("*.jsonl"))
               for a in sorted(read_records(path), key=lambda a: a["question_id"])]
    if not answers:
        raise FileNotFoundError(f"{mt_bench / 'reference_answer'}: no reference answers")
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"instruction": questions[a["question_id"]]["turns"][0], "input": "",
                         "output": a["choices"][0]["turns"][0]}, ensure_ascii=False) for a in answers]
    write_text(out, "\n".join(lines) + "\n")
    return out


def offline_tasks(tokenizer, shared_data: str | Path = SHARED_DATA, work_dir: str | Path | None = None,
                  loglik_limit: int | None = None, em_limit: int | None = 200, max_gen_toks: int = 256,
                  max_length: int | None = None, test_limit: int | None = None, mt_bench: bool = False) -> list[dict]:
    """The four offline task dicts, and ``mt_bench_reference_loglik`` last when ``mt_bench``. ``loglik_limit``:
    first N records of GSM8K, MATH and the MT-Bench references; ``test_limit``: first N of test.json (default
    all 280); ``em_limit``: GSM8K questions generated; ``max_length``: score only what training would see."""
    shared = Path(shared_data)
    work = Path(work_dir) if work_dir else REPO / "runs" / "llama3" / "eval_tasks"
    gsm8k = questions_to_alpaca(shared / "gsm8k" / "test.jsonl", work / "gsm8k_test.alpaca.jsonl", "question", "answer")
    math = questions_to_alpaca(shared / "math" / "test.jsonl", work / "math_test.alpaca.jsonl", "problem", "solution")
    rendered = work / "rendered"
    tasks = [
        response_loglik_task("llama3_test", shared / "scalebio_math_exp_rlhflow_less_oss" / "test.json",
                             tokenizer=tokenizer, limit=test_limit, rendered_dir=rendered, max_length=max_length),
        response_loglik_task("gsm8k_test_loglik", gsm8k, fmt="alpaca", tokenizer=tokenizer, limit=loglik_limit,
                             rendered_dir=rendered, max_length=max_length),
        response_loglik_task("math_test_loglik", math, fmt="alpaca", tokenizer=tokenizer, limit=loglik_limit,
                             rendered_dir=rendered, max_length=max_length),
        exact_match_task("gsm8k_exact_match", shared / "gsm8k" / "test.jsonl", question_field="question",
                         answer_field="answer", limit=em_limit, tokenizer=tokenizer, max_gen_toks=max_gen_toks,
                         rendered_dir=rendered),
    ]
    if mt_bench:
        references = mt_bench_references_to_alpaca(shared / "mt_bench", work / "mt_bench_reference.alpaca.jsonl")
        tasks.append(response_loglik_task("mt_bench_reference_loglik", references, fmt="alpaca", tokenizer=tokenizer,
                                          limit=loglik_limit, rendered_dir=rendered, max_length=max_length))
    return tasks



def evaluate_model(model, tokenizer, out: Path, work: Path, max_length: int, settings: dict) -> None:
    """The offline tasks on one model (in memory) → ``out`` (eval.json), as offline.py and protocol.py evaluate
    every arm. ``settings``: ``loglik_limit``, ``em_limit``, ``max_gen_toks``, ``test_limit`` (offline_tasks);
    ``mt_bench``: also MT-Bench's reference answers; ``samples``: also the per-document ``eval_samples.jsonl``
    beside ``out``."""
    tasks = offline_tasks(tokenizer, work_dir=work, loglik_limit=settings["loglik_limit"],
                          em_limit=settings["em_limit"], max_gen_toks=settings["max_gen_toks"],
                          max_length=max_length, test_limit=settings.get("test_limit"),
                          mt_bench=settings.get("mt_bench", False))
    samples = out.with_name("eval_samples.jsonl") if settings.get("samples") else None
    evaluate(model, tokenizer, tasks, out, samples_out=samples)

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory (e.g. a finetune run's model/) or hub id")
    parser.add_argument("--gguf-file", default=None, help="a GGUF file inside --model (the offline base model)")
    parser.add_argument("--out", required=True, help="eval.json to write")
    parser.add_argument("--online", action="store_true", help=f"also run {', '.join(ONLINE_TASKS)} (needs a network)")
    parser.add_argument("--shared-data", default=str(SHARED_DATA))
    parser.add_argument("--work-dir", default=None, help="converted and rendered task files (default runs/llama3/eval_tasks)")
    parser.add_argument("--loglik-limit", type=int, default=None, help="first N GSM8K / MATH records (default all)")
    parser.add_argument("--em-limit", type=int, default=200, help="GSM8K questions for exact match")
    parser.add_argument("--max-gen-toks", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=None, help="score only the first N tokens, as training")
    parser.add_argument("--online-limit", type=int, default=None, help="documents per online task (default all)")
    parser.add_argument("--mt-bench", action="store_true", help="also score MT-Bench's GPT-4 reference answers")
    parser.add_argument("--samples", action="store_true", help="also write per-document values to eval_samples.jsonl")
    parser.add_argument("--write-yaml", default=None, help="also save the offline tasks as lm-eval YAMLs in this folder")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, args.gguf_file, device)
    tasks = offline_tasks(tokenizer, args.shared_data, args.work_dir, args.loglik_limit, args.em_limit,
                          args.max_gen_toks, args.max_length, mt_bench=args.mt_bench)
    if args.write_yaml:
        for task in tasks:
            write_task_yaml(task, Path(args.write_yaml) / f"{task['task']}.yaml")
    out = Path(args.out)
    evaluate(model, tokenizer, tasks, out, batch_size=args.batch_size, device=device,
             samples_out=out.with_name("eval_samples.jsonl") if args.samples else None)
    if args.online:
        # A separate call, so `--online-limit` applies to these only and a download failure keeps the offline file.
        online = evaluate(model, tokenizer, list(ONLINE_TASKS), out.with_name("eval_online.json"),
                          limit=args.online_limit, batch_size=args.batch_size, device=device)
        merged = json.loads(out.read_text())
        merged["tasks"].update(online["tasks"])
        merged["n_samples"].update(online["n_samples"])
        merged["online_limit"] = args.online_limit
        write_text(out, json.dumps(merged, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
