# Sourced by the device scripts (device_checks.sh, device_fmnist_study.sh) on a lent machine
# with $PY and $OUT set: installs the carried wheels (.whl/) when optuna or higher is missing,
# makes gradhpo.models importable from the source tree (it is the top-level models/, mapped by
# pyproject, and the tree is not installed there), and records the machine in $OUT/machine.txt.
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! $PY -c "import optuna, higher" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import gradhpo.models" 2>/dev/null; then
    [ -e gradhpo/models ] || ln -s ../models gradhpo/models
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import torch, gradhpo.models; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    | tee "$OUT/machine.txt" || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv >>"$OUT/machine.txt" 2>&1
