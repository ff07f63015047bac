#!/usr/bin/env bash
# Runs mlp_experiments.py --only autows one configuration per process under a timeout (a warp-specialised config
# that deadlocks on the GPU costs its timeout, not the whole run). Usage: bash benchmarks/autows_driver.sh N:sp [mm1,mm2]
set -u
shape=${1:-16896:0.7}; gemms=${2:-mm1,mm2}
cd "$(dirname "$0")/.."
RESULTS_SUFFIX=_baselines timeout 60 python3 benchmarks/mlp_experiments.py --only autows --shapes "$shape" --gemms "$gemms" --autows-configs 0 || echo "baselines: rc=$?"
for i in 2 3 4 5 6 7 1; do
  RESULTS_SUFFIX=_config$i timeout 35 python3 benchmarks/mlp_experiments.py --only autows --shapes "$shape" --gemms "$gemms" --no-baselines --autows-configs $i || echo "config $i: rc=$? (timeout 124 = hung)"
done
