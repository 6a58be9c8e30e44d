#!/usr/bin/env bash
# One offline run of a variant on a generated dataset (DATASET, default pointmaze-medium-navigate-v0), for ablations:
#   [DATASET=...] bash benchmarks/experiments/offline_variant.sh <name> <minutes> <seed> [offline_trainer.py flags ...]
# e.g. DATASET=pointmaze-medium-stitch-v0 bash benchmarks/experiments/offline_variant.sh beta1 20 0 --beta 1
# One thread, so two variants can run side by side on 2 cores; final greedy evaluation of 5 tasks x 10
# episodes; outputs in runs/exp/<name>, log in runs/exp/<name>.log, summary line at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
name=$1; minutes=$2; seed=$3; shift 3
dataset=${DATASET:-pointmaze-medium-navigate-v0}
[ -f datasets/generated/${dataset}.npz ] || python ogbench_utils.py generate ${dataset}
mkdir -p runs/exp
python offline_trainer.py --dataset ${dataset} --dataset_dir datasets/generated --seed ${seed} \
  --time_budget ${minutes} --num_epochs 1000 --updates_per_epoch 200 --eval_every 1000 --eval_episodes 10 \
  --threads 1 --save_dir runs/exp/${name} --overwrite --no_progress "$@" > runs/exp/${name}.log 2>&1
python benchmarks/summarize.py runs/exp/${name}
