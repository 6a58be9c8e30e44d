#!/usr/bin/env bash
# Online benchmark of issue 4 on pointmaze-medium-navigate-v0 (generated locally), 3 seeds:
#   bash benchmarks/online_pointmaze.sh weak [offline minutes] [parallel runs]
#     a deliberately weak offline checkpoint (--max_trajectories 100, a short budget), then 300 online
#     episodes; the online trainer evaluates greedily (5 tasks x 20 episodes) at episode 0 and every 100
#   bash benchmarks/online_pointmaze.sh strong
#     300 online episodes from the offline benchmark's checkpoints (benchmarks/offline_pointmaze.sh first)
# summarize.py prints the success before and after and the change, mean +/- std over the seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
start=${1:-weak}
offline_minutes=${2:-10}
parallel=${3:-3}
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
    checkpoint=runs/bench/navigate-seed${seed}/best_model.pth
  fi
  python online_trainer.py --dataset ${dataset} --dataset_dir datasets/generated --seed ${seed} \
    --checkpoint ${checkpoint} --max_episodes 300 --eval_every 100 --eval_episodes 20 --threads 1 \
    --save_dir runs/bench/online-${start}-seed${seed} --overwrite --no_progress \
    > runs/bench/online-${start}-seed${seed}.log 2>&1
}
mkdir -p runs/bench
for seed in 0 1 2; do
  run_seed ${seed} &
  while [ "$(jobs -rp | wc -l)" -ge "${parallel}" ]; do sleep 5; done
done
wait
python benchmarks/summarize.py runs/bench/online-${start}-seed0 runs/bench/online-${start}-seed1 runs/bench/online-${start}-seed2
