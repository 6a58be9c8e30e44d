#!/usr/bin/env bash
# Offline benchmark: one dataset generated locally with OGBench's recipe (generate runs first if the file is
# missing), a time budget of training per run (checked every 100 updates, so with the last epoch's overshoot a
# 29-minute run stays within 30 minutes), then 5 tasks x 20 episodes of greedy evaluation; 3 seeds.
#   bash benchmarks/offline_benchmark.sh [dataset] [minutes] [parallel runs] [trainer flags...]
#   e.g. SEEDS="9 10 11" bash benchmarks/offline_benchmark.sh pointmaze-medium-navigate-v0 29 1
# Trainer flags after the third argument go to every run (a variant of the defaults), whose folders are then
# runs/bench/${dataset}-${RUN_TAG}-seed* (RUN_TAG, default "variant"). SEEDS="0 1" runs only those seeds (default
# "0 1 2"), e.g. to split a sequential benchmark; then summarize.py over all the seed folders.
# The seeds run side by side, sharing the cores (threads per run = cores / parallel runs, at least 1): pass 1 to
# give each seed the whole machine in turn (a 2-core CPU for 30 minutes per seed), 3 to run all three at once on
# one thread each (a third of the wall-clock, fewer updates per seed).
set -euo pipefail
cd "$(dirname "$0")/.."
dataset=${1:-pointmaze-medium-navigate-v0}
minutes=${2:-29}
parallel=${3:-3}
shift $(( $# < 3 ? $# : 3 ))
name=${dataset}
[ $# -gt 0 ] && name=${dataset}-${RUN_TAG:-variant}
[ -f datasets/generated/${dataset}.npz ] || python ogbench_utils.py generate ${dataset}
extra=("$@")
threads=$(( $(nproc) / parallel )); [ ${threads} -ge 1 ] || threads=1
run_seed() {
  python offline_trainer.py --dataset ${dataset} --dataset_dir datasets/generated --seed $1 \
    --time_budget ${minutes} --num_epochs 10000 --updates_per_epoch 100 --eval_every 100000 --eval_episodes 20 --threads ${threads} \
    --save_dir runs/bench/${name}-seed$1 --overwrite --no_progress "${extra[@]}" > runs/bench/${name}-seed$1.log 2>&1
}
source benchmarks/seeds.sh
run_seeds ${name} ${parallel}
