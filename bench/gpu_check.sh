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
source bench/_steps.sh
environment

install_here "${INSTALL_TIMEOUT:-300}"

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

finish
