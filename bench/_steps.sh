# Shared by the GPU scripts (sourced): timed, logged steps that never stop the script.
#   step NAME TIMEOUT_S COMMAND...   runs COMMAND under a time limit, tees it to
#                                    $LOG_DIR/NAME.log, records NAME in $failed on failure.
#   environment                      GPU, driver, torch/triton/nvcc versions → environment.log
#   install_here TIMEOUT_S           pip install -e . (builds csrc/ when nvcc is there), then
#                                    imports the package from this checkout whatever pip did
#   finish                           the summary line; exit status 1 if any step failed.
# The caller cds to the repository root first. PYTHON defaults to python3; logs go to $OUT
# when it is set, else to a temporary folder.
PYTHON="${PYTHON:-python3}"
LOG_DIR="${OUT:-$(mktemp -d)}"
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
failed=()

step() {
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

environment() {
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
        "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
        command -v nvcc >/dev/null && nvcc --version | tail -n 1
    } | tee "$LOG_DIR/environment.log"
}

install_here() {
    step install "$1" "$PYTHON" -m pip install -e . --no-deps --no-build-isolation
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    "$PYTHON" -c "from spectral_kernels.ops import available_backends as a; print('backends:', a())" 2>&1 \
        | tee -a "$LOG_DIR/environment.log"
}

finish() {
    if [ ${#failed[@]} -eq 0 ]; then
        echo "=== all steps passed; logs in $LOG_DIR"
    else
        echo "=== failed steps: ${failed[*]}; logs in $LOG_DIR"
        exit 1
    fi
}
