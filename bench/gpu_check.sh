#!/usr/bin/env bash
# What a session with a GPU runs, in as few device calls as possible:
#
#   bash bench/gpu_check.sh OUT_DIR [STAGE ...]
#
# Stages (default: all, in this order): versions, native (builds the C++ CPU kernels in place
# against the image's torch, so that the tests run them there too), tune (bench/tune_tree_attention.py; the
# chosen tiles are then used through QUIETSTAR_TREE_ATTENTION_CONFIGS), kernels (bench of
# tree_attention and linear_cross_entropy at the GPU sizes), tests (the whole suite on
# CUDA), step (the training-step bench), dtypes (the B=8 L=256 step of a float32 model, without
# and with bfloat16 autocast: the speed-up over float32), profile (bench/profile_step.py: where the B=1 L=128
# step's time goes), floor (the same step with the model's widths divided by 4, head size 16:
# its cost per operator, launches and Python), probe (does one training step fit at L=1024).
# Every stage has a time limit (seconds, overridable: LIMIT_TUNE=...), logs into
# OUT_DIR/log.txt and writes its results into OUT_DIR. On an H200 (2026-11-25): tune 75 s;
# tests 50 s; step over 120 s; probe 55 s; kernels over 220 s (linear cross-entropy and
# tree attention at L=4096 fit in that, FlexAttention's compilation at L=2048 did not). On an
# H100 (2026-11-27): native 41 s; tests 163 s; profile 39 s; step over 200 s (both sizes). On an
# H200 (2026-11-28): native 38 s; tests 145 s; step over 150 s; dtypes over 140 s (the reference's
# failed try, then the float32 variant's warm-up, memory and timed steps of 13.4 s each: give it
# its default 300 s).
# A kernel change is best judged first by bench/compare_tree_attention_kernels.py (old and new
# kernels in one process, about 40 s at L=4096), then by the kernels stage.
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:?usage: bash bench/gpu_check.sh OUT_DIR [STAGE ...]}")
shift
stages=${*:-versions native tune kernels tests step dtypes profile floor probe}
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1

run() {  # run LIMIT COMMAND...: one stage's command, its output and exit status logged
    local limit=$1
    shift
    echo "=== $(date +%T) [limit ${limit}s] $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== $(date +%T) exit ${PIPESTATUS[0]}" | tee -a "$log"
}

# Without an install (a GPU image with no network): the checkout on the path, and
# quietstar.kernels (the top-level kernels/ folder that setup.py maps) as a link.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import quietstar.kernels" 2>/dev/null || ln -sfn ../kernels quietstar/kernels
tuned="$out/tuned.json"
for stage in $stages; do
    [ -s "$tuned" ] && export QUIETSTAR_TREE_ATTENTION_CONFIGS="$tuned"
    case $stage in
    versions)
        run 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
        run 60 python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
        ;;
    native)
        command -v ninja >/dev/null && export CMAKE_GENERATOR=Ninja
        run "${LIMIT_NATIVE:-150}" python setup.py -q build_ext --inplace
        run 60 python -c "from quietstar.ops.native import native_available; print('native kernels:', native_available())"
        ;;
    tune) run "${LIMIT_TUNE:-150}" python bench/tune_tree_attention.py --length 4096 --json "$tuned" ;;
    kernels) run "${LIMIT_KERNELS:-420}" python bench/run.py --case linear_cross_entropy tree_attention --repeats 5 --json "$out/kernels.json" ;;
    tests) run "${LIMIT_TESTS:-180}" env OMP_NUM_THREADS=1 python -m pytest -q -n 12 --timeout 150 -p no:cacheprovider tests ;;
    step) run "${LIMIT_STEP:-240}" python bench/run.py --case training_step --repeats 3 --json "$out/step.json" ;;
    dtypes) run "${LIMIT_DTYPES:-300}" python bench/run.py --case training_step --size "B=8 L=256" --variant quietstar+sampling-fp32 quietstar+sampling-bf16 --repeats 3 --json "$out/dtypes.json" ;;
    profile) run "${LIMIT_PROFILE:-120}" python bench/profile_step.py --size "B=1 L=128" ;;
    floor) run "${LIMIT_FLOOR:-90}" python bench/profile_step.py --size "B=1 L=128" --narrow 4 --top 10 ;;
    probe) run "${LIMIT_PROBE:-100}" python bench/run.py --case training_step --max-length --memory-gib 79 --start-length 1024 --length-limit 1024 --json "$out/max_length.json" ;;
    *) echo "unknown stage $stage" | tee -a "$log" ;;
    esac
done
