#!/usr/bin/env bash
# k = subgoal_steps: k=25 (HIQL's choice for these mazes) against k=1 (the literal Q(s, s')), same budget.
#   bash benchmarks/experiments/subgoal_steps.sh [minutes] [seed]
# Both runs go side by side, one thread each, on pointmaze-medium-navigate-v0 (generated locally).
set -euo pipefail
cd "$(dirname "$0")/../.."
minutes=${1:-25}
seed=${2:-0}
dataset=pointmaze-medium-navigate-v0
[ -f datasets/generated/${dataset}.npz ] || python ogbench_utils.py generate ${dataset}
mkdir -p runs/bench
for k in 25 1; do
  python offline_trainer.py --dataset ${dataset} --dataset_dir datasets/generated --seed ${seed} \
    --subgoal_steps ${k} --time_budget ${minutes} --num_epochs 1000 --updates_per_epoch 200 --eval_every 1000 \
    --eval_episodes 20 --threads 1 --save_dir runs/bench/k${k}-seed${seed} --overwrite --no_progress \
    > runs/bench/k${k}-seed${seed}.log 2>&1 &
done
wait
python benchmarks/summarize.py runs/bench/k25-seed${seed}
python benchmarks/summarize.py runs/bench/k1-seed${seed}
