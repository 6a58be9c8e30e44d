#!/usr/bin/env bash
# Online benchmark (issue 25): fine-tune the offline benchmark's checkpoints, one per seed, for a fixed number of
# episodes, with greedy evaluation (5 tasks x 20 episodes) before the first online step, every 50 episodes and at
# the end; then the summary (the mean of the last 3 evaluations, the change and the dip, mean +/- std over seeds).
#   bash benchmarks/online_benchmark.sh DATASET [checkpoint runs] [parallel runs] [episodes] [online flags...]
#   e.g. SEEDS="10 11 12" bash benchmarks/online_benchmark.sh pointmaze-medium-stitch-v0 \
#            runs/bench/pointmaze-medium-stitch-v0 2 300
#        RUN_TAG=control SEEDS="10 11 12" bash benchmarks/online_benchmark.sh pointmaze-medium-stitch-v0 \
#            runs/bench/pointmaze-medium-stitch-v0 2 300 --online_ratio 0      # the same updates, no online data
# Seed S starts from ${checkpoint runs}-seedS/last_model.pth (the offline benchmark's folders; default
# runs/bench/DATASET). Its run folder is runs/bench/online-DATASET-seedS, or online-DATASET-${RUN_TAG}-seedS when
# flags are passed (RUN_TAG, default "variant"). Threads per run = cores / parallel runs, at least 1.
set -euo pipefail
cd "$(dirname "$0")/.."
dataset=${1:?usage: online_benchmark.sh DATASET [checkpoint runs] [parallel] [episodes] [online flags...]}
checkpoints=${2:-runs/bench/${dataset}}
parallel=${3:-1}
episodes=${4:-300}
shift $(( $# < 4 ? $# : 4 ))
name=online-${dataset}
[ $# -gt 0 ] && name=online-${dataset}-${RUN_TAG:-variant}
extra=("$@")
threads=$(( $(nproc) / parallel )); [ ${threads} -ge 1 ] || threads=1
run_seed() {
  local checkpoint=${checkpoints}-seed$1/last_model.pth
  [ -f ${checkpoint} ] || { echo "error: ${checkpoint} does not exist: run benchmarks/offline_benchmark.sh first" >&2; return 1; }
  python online_trainer.py --dataset ${dataset} --dataset_dir datasets/generated --seed $1 --checkpoint ${checkpoint} \
    --max_episodes ${episodes} --eval_every 50 --eval_episodes 20 --threads ${threads} \
    --save_dir runs/bench/${name}-seed$1 --overwrite --no_progress "${extra[@]}" > runs/bench/${name}-seed$1.log 2>&1
}
source benchmarks/seeds.sh
run_seeds ${name} ${parallel}
