# Sourced by the benchmark scripts, which define run_seed SEED: runs it for each seed of SEEDS (default "0 1 2"),
# PARALLEL at a time, then prints the summary of the folders runs/bench/NAME-seedS.
#   run_seeds NAME PARALLEL
run_seeds() {
  local name=$1 parallel=$2 seed
  local seeds=(${SEEDS:-0 1 2})
  mkdir -p runs/bench
  for seed in "${seeds[@]}"; do
    run_seed ${seed} &
    while [ "$(jobs -rp | wc -l)" -ge "${parallel}" ]; do sleep 5; done
  done
  wait
  python benchmarks/summarize.py "${seeds[@]/#/runs/bench/${name}-seed}"
}
