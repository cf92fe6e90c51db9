#!/usr/bin/env bash
# Every GPU figure the open issues still ask for, in one call sized for a lent machine
# (15 min of device time per session, machine start included; one command ≤ 10 min):
#
#   install        pip install -e . (csrc/ built with MAX_JOBS = all cores)      issue 3
#   primitive      bench/gpu_bench.py at N = 65 536 and 262 144: triton / cuda
#                  vs SDPA cuDNN, flash, mem-efficient, chunked torch; symmetric  issues 2, 3
#   solver         bench/bench_solver.py, fp32 q/k, then bf16 q/k (SD, DINOv2)    issue 5
#   eigsh          bench/bench_eigsh.py --gpu: 12-head N = 65 536, top-20         issue 4
#   knn            bench/bench_knn.py: N = 1 000 000, d = 64, 50 + 50              issue 6
#   dataset        1 000 real images (bench/make_image_folder.py) at 32 × 32
#                  DINOv2 tokens through `spectral-kernels dataset`, to the end    issue 6
#   gpu_tests      pytest -m gpu with whatever time is left
#
# Steps run in that order (priority), each under its own limit (seconds, overridable:
# INSTALL_TIMEOUT 150, PRIMITIVE_TIMEOUT 100, SOLVER_TIMEOUT 45 each, EIGSH_TIMEOUT 40,
# KNN_TIMEOUT 45, DATASET_TIMEOUT 120, TEST_TIMEOUT 60: ≈ 9.5 min in all); a failing or
# timed-out step is reported and the next one runs. Logs go to $OUT (else a temporary
# folder); the dataset's per-image results stay in the temporary folder.
#
#   bash bench/gpu_all.sh            # on the device machine, from the repository root
set -u -o pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LOG_DIR="${OUT:-$(mktemp -d)}"
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
source bench/_steps.sh
environment

install_here "${INSTALL_TIMEOUT:-150}"

step primitive "${PRIMITIVE_TIMEOUT:-100}" "$PYTHON" bench/gpu_bench.py --sizes 65536,262144
step solver "${SOLVER_TIMEOUT:-45}" "$PYTHON" bench/bench_solver.py --device cuda --steps 20
step solver_bf16 "${SOLVER_TIMEOUT:-45}" "$PYTHON" bench/bench_solver.py --device cuda --steps 20 \
    --methods solver --qk-dtype bfloat16
step eigsh "${EIGSH_TIMEOUT:-40}" "$PYTHON" bench/bench_eigsh.py --gpu --n 65536 --heads 12
step knn "${KNN_TIMEOUT:-45}" "$PYTHON" bench/bench_knn.py --device cuda --n 1000000 --methods blockwise

work="$(mktemp -d)"
# 1 000 images × 448² px = 32 × 32 DINOv2 tokens; 100 outer steps of 40 images = 4 epochs.
step dataset "${DATASET_TIMEOUT:-120}" bash -c "
    '$PYTHON' bench/make_image_folder.py '$work/images' --count 1000 --size 448 &&
    '$PYTHON' -m spectral_kernels.cli dataset '$work/images' --out '$work/result' --device cuda \
        --steps 100 --batch-images 40 &&
    ls '$work/result' | grep -c '\.npz$'"

step gpu_tests "${TEST_TIMEOUT:-60}" "$PYTHON" -m pytest tests -m gpu -q
finish
