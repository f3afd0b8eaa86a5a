#!/usr/bin/env bash
# bash experiments/llama3/launch_single_node.sh            (from the repo root; SIZE=70b ACCELERATE_CONFIG=... to change)
# The large-model pipeline on one node, stage by stage: pool → reweight → resample (learned, uniform) →
# fine-tune both arms → evaluate. Under either accelerate config, reweight and finetune shard their models with
# torch FSDP (README.md, "Distributed path").
set -euo pipefail

SIZE=${SIZE:-8b}                                   # 8b | 70b
SEED=${SEED:-0}
NUM_GPUS=${NUM_GPUS:-8}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-experiments/llama3/accelerate_fsdp.yaml}   # or accelerate_deepspeed_zero3.yaml
N_FINETUNE=${N_FINETUNE:-10000}                    # method.md §6
RUNS=runs/llama3/$SIZE
RESULTS=results/llama3/$SIZE
JUDGE_URL=${JUDGE_URL:-}                           # an OpenAI-compatible endpoint for MT-Bench; empty: answers only
JUDGE_MODEL=${JUDGE_MODEL:-gpt-4}
LAUNCH="accelerate launch --config_file $ACCELERATE_CONFIG --num_processes $NUM_GPUS"

# 1. the pool (3,000 per source, decontaminated)
python experiments/llama3/build_pool.py

# 2. reweight: learned weights → $RUNS/reweight_seed$SEED/weights.json
$LAUNCH -m scalebio.cli reweight experiments/llama3/llama3_$SIZE.yaml seed=$SEED run_dir=$RUNS/reweight_seed$SEED
mkdir -p $RESULTS/reweight_seed$SEED
cp $RUNS/reweight_seed$SEED/{weights.json,config.yaml,meta.json} $RESULTS/reweight_seed$SEED/

# 3. resample 10,000 by the learned weights, and uniformly (the baseline) from the same decontaminated pool
scalebio resample $RUNS/reweight_seed$SEED --n $N_FINETUNE --seed $SEED --out $RUNS/learned_seed$SEED.jsonl
scalebio resample $RUNS/reweight_seed$SEED --n $N_FINETUNE --seed $SEED --uniform --out $RUNS/uniform_seed$SEED.jsonl

# 4. fine-tune both arms (train.path is absolute: relative paths resolve against the config's folder)
for METHOD in learned uniform; do
  $LAUNCH -m scalebio.cli finetune experiments/llama3/finetune_$SIZE.yaml seed=$SEED \
    train.path=$PWD/$RUNS/${METHOD}_seed$SEED.jsonl output_dir=$RUNS/finetune_${METHOD}_seed$SEED
done

# 5. evaluate: offline tasks (GSM8K / MATH / test.json log-likelihood, GSM8K exact match) + lm-eval standard tasks,
#    then MT-Bench answers (scored only with a judge)
for METHOD in learned uniform; do
  python experiments/llama3/tasks.py --model $RUNS/finetune_${METHOD}_seed$SEED/model --online \
    --out $RESULTS/${METHOD}_seed$SEED/eval.json
  python experiments/llama3/mt_bench.py --model $RUNS/finetune_${METHOD}_seed$SEED/model \
    --out $RESULTS/${METHOD}_seed$SEED/mt_bench.json ${JUDGE_URL:+--judge-url $JUDGE_URL --judge-model $JUDGE_MODEL}
done

# 6. the table
python experiments/llama3/table1.py
