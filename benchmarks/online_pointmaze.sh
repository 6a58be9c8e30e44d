#!/usr/bin/env bash
# Online benchmark of issue 4 on pointmaze-medium-navigate-v0 (generated locally), 3 seeds:
#   bash benchmarks/online_pointmaze.sh weak [offline minutes] [parallel runs] [episodes] [seeds]
#     a deliberately weak offline checkpoint (--max_trajectories 100, a short budget), then online
#     episodes (300); the online trainer evaluates greedily (5 tasks x 20 episodes) at episode 0 and every third
#   bash benchmarks/online_pointmaze.sh strong [ignored] [parallel runs] [episodes] [seeds]
#     online episodes (300) from the offline benchmark's checkpoints (benchmarks/offline_benchmark.sh first)
# summarize.py prints the success before and after and the change, mean +/- std over the seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
start=${1:-weak}
offline_minutes=${2:-10}
parallel=${3:-3}
episodes=${4:-300}
seeds=${5:-"0 1 2"}
dataset=pointmaze-medium-navigate-v0
[ -f datasets/generated/${dataset}.npz ] || python ogbench_utils.py generate ${dataset}
run_seed() {
  local seed=$1 checkpoint
  if [ "${start}" = weak ]; then
    python offline_trainer.py --dataset ${dataset} --dataset_dir datasets/generated --seed ${seed} \
      --max_trajectories 100 --time_budget ${offline_minutes} --num_epochs 1000 --eval_every 1000 \
      --eval_episodes 20 --threads 1 --save_dir runs/bench/weak-seed${seed} --overwrite --no_progress \
      > runs/bench/weak-seed${seed}.log 2>&1
    checkpoint=runs/bench/weak-seed${seed}/best_model.pth
  else
    checkpoint=runs/bench/${dataset}-seed${seed}/best_model.pth
  fi
  python online_trainer.py --dataset ${dataset} --dataset_dir datasets/generated --seed ${seed} \
    --checkpoint ${checkpoint} --max_episodes ${episodes} --eval_every $((episodes / 3)) --eval_episodes 20 --threads 1 \
    --save_dir runs/bench/online-${start}-seed${seed} --overwrite --no_progress \
    > runs/bench/online-${start}-seed${seed}.log 2>&1
}
mkdir -p runs/bench
for seed in ${seeds}; do
  run_seed ${seed} &
  while [ "$(jobs -rp | wc -l)" -ge "${parallel}" ]; do sleep 5; done
done
wait
python benchmarks/summarize.py $(for seed in ${seeds}; do echo runs/bench/online-${start}-seed${seed}; done)
