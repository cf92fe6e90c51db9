#!/usr/bin/env bash
# One command for a GPU machine (torch 2.11, triton 3.6, CUDA 13, nvcc, no network):
#   install (builds the csrc/ CUDA extension when nvcc is present) → GPU tests →
#   bench/gpu_bench.py's table → the whole Triton test file on the GPU.
# A failing step is reported and the next one still runs, so the table always prints.
# Logs go to $OUT when it is set (else a temporary folder). Extra arguments are passed
# to gpu_bench.py (e.g. --quick). Step time limits in seconds: TEST_TIMEOUT (GPU tests,
# default 240), BENCH_TIMEOUT (300), TRITON_TEST_TIMEOUT (240), INSTALL_TIMEOUT (300).
set -u -o pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LOG_DIR="${OUT:-$(mktemp -d)}"
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== ${name}: $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        echo "=== ${name}: ok ($((SECONDS - start)) s)"
    else
        echo "=== ${name}: FAILED with exit code $rc ($((SECONDS - start)) s); continuing"
        failed+=("$name")
    fi
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
    command -v nvcc >/dev/null && nvcc --version | tail -n 1
} | tee "$LOG_DIR/environment.log"

step install "${INSTALL_TIMEOUT:-300}" "$PYTHON" -m pip install -e . --no-deps --no-build-isolation
# Whatever pip managed, import the package from this checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "from spectral_kernels.ops import available_backends as a; print('backends:', a())" 2>&1 \
    | tee -a "$LOG_DIR/environment.log"

# no -x: one failing GPU test must not hide the results of the others
step gpu_tests "${TEST_TIMEOUT:-240}" "$PYTHON" -m pytest tests -m gpu -q
# The table before the long tail: the Triton test file's many small odd shapes compile many
# kernel variants (with the default tile only), and must not keep the table from printing.
step bench "${BENCH_TIMEOUT:-300}" "$PYTHON" bench/gpu_bench.py "$@"
# pytest-xdist, when installed, spreads those compiles over the CPU cores.
parallel=()
"$PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n 8)
SPECTRAL_KERNELS_TRITON_AUTOTUNE=0 step triton_tests "${TRITON_TEST_TIMEOUT:-240}" \
    "$PYTHON" -m pytest tests/test_triton_backend.py -q "${parallel[@]}"

if [ ${#failed[@]} -eq 0 ]; then
    echo "=== all steps passed; logs in $LOG_DIR"
else
    echo "=== failed steps: ${failed[*]}; logs in $LOG_DIR"
    exit 1
fi
