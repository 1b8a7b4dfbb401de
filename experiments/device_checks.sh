#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script for a short lease on a lent machine:
#   1. the CUDA tests (iterator/augment, TrainingRun and implicit differentiation against CPU);
#   2. the engine benchmark on CUDA (issue 14): plain, gradhpo's modes, higher, a bare unroll,
#      TorchOpt, interleaved, medians;
#   3. the batched PBT population against a loop of TrainingRuns on CUDA (goal >= 8x);
#   4. the hypergradient-descent optimizers against torch.optim on CUDA;
#   5. the engine's forward mode with torch.compile on CUDA (compiles: last, own time limit).
# Each step has its own time limit (570 s in all) so one slow step cannot eat the others. Logs go to $OUT
# (at most 8 files come back from a lease, so each step writes one log plus one table).
#
# Where the machine lacks optuna/higher/TorchOpt, put their wheels (and their missing
# dependencies: alembic, colorlog, sqlalchemy, greenlet, mako, cmaes, mnist1d, optree, graphviz)
# in .whl/ (`pip download --no-deps --only-binary=:all: --python-version 3.12 ...`) and carry
# it; they are installed into /tmp/site. BENCHMARKS.md records what a run gave.
#   PY=python3 OUT=/tmp/out bash experiments/device_checks.sh [quick]
set -u
PY=${PY:-python3}
OUT=${OUT:-/tmp/gradhpo-device}
QUICK=${1:-}
source experiments/device_setup.sh

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc after $((SECONDS - t0))s"
    tail -n 25 "$OUT/$name.log"
}

if [ "$QUICK" = quick ]; then
    ENGINE=(--quick --rounds 2) PBT=(--reps 2 --steps 5 --warmup 2) HD=(--quick)
else
    ENGINE=(--rounds 7) PBT=() HD=()
fi
DEV=cuda
$PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" || DEV=cpu

step cuda_tests 120 $PY -m pytest -q -p no:cacheprovider -k "cuda or device" \
    tests/test_data.py tests/test_run.py tests/hyper/test_implicit.py tests/optim/test_hd.py
step engine 150 $PY experiments/bench_engine.py --device $DEV --out /tmp/engine "${ENGINE[@]}"
cp /tmp/engine/summary.csv "$OUT/engine_summary.csv" 2>/dev/null
step pbt_batched 90 $PY experiments/bench_pbt_batched.py --device $DEV --threads 2 \
    --out /tmp/pbt "${PBT[@]}"
cp /tmp/pbt/results.md "$OUT/pbt_batched.md" 2>/dev/null
step hd 120 $PY experiments/bench_hd_optimizers.py --device $DEV --out /tmp/hd --hd-paths foreach \
    "${HD[@]}"
step engine_compile 90 $PY experiments/bench_engine.py --device $DEV --compile --problems c \
    --out /tmp/engine_compile "${ENGINE[@]}"
echo "done"
