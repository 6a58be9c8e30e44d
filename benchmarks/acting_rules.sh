#!/usr/bin/env bash
# Every acting rule on one finished run's checkpoint, and the inverse dynamics with the oracle's subgoals (the low
# level alone), 5 tasks x 20 episodes each; what the offline benchmark's tables report beside its own number.
# The data are read from datasets/generated, where the benchmarks generate them.
#   bash benchmarks/acting_rules.sh RUN_FOLDER DATASET SEED [threads]
#   e.g. bash benchmarks/acting_rules.sh runs/bench/antmaze-medium-navigate-v0-seed1 antmaze-medium-navigate-v0 1
# MODES (default "oracle,goal") are the diagnose_acting.py modes run after the two evaluations.
set -euo pipefail
cd "$(dirname "$0")/.."
run=$1 dataset=$2 seed=$3 threads=${4:-2}
checkpoint=${run}/last_model.pth
modes=${MODES:-oracle,goal}
export OMP_NUM_THREADS=${threads}
echo "# the same checkpoint, other acting: python offline_trainer.py evaluate ${checkpoint} --dataset ${dataset} --dataset_dir datasets/generated --seed ${seed} [flags]"
for flags in "--subgoal_source proposer" "--subgoal_source data"; do
  echo "## ${flags}"
  python offline_trainer.py evaluate ${checkpoint} --dataset ${dataset} --dataset_dir datasets/generated --seed ${seed} ${flags} \
    2>/dev/null | tail -1
done
echo "# python benchmarks/diagnose_acting.py ${checkpoint} --dataset ${dataset} --dataset_dir datasets/generated --seed ${seed} --modes ${modes}"
python benchmarks/diagnose_acting.py ${checkpoint} --dataset ${dataset} --dataset_dir datasets/generated --seed ${seed} --modes ${modes} 2>/dev/null
