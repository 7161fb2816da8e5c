#!/usr/bin/env bash
# A GPU session's work in three stages, each sized for one 10-minute call on an offline
# GPU machine that already has torch, Triton and the test tools, or in one stage when the
# session's device time allows a single call:
#
#   bash benchmarks/gpu_session.sh core     # build, then what the open acceptance bars need
#                                           # first: gpu_wgrad, gpu_wrapper, and the kernel
#                                           # tests (CUDA, the ops, Triton) with what is left
#   bash benchmarks/gpu_session.sh test     # build the extension, the whole test suite
#                                           # (kernel tests, then the rest)
#   bash benchmarks/gpu_session.sh bench1   # gpu_accumulate, gpu_wrapper (two sizes), gpu_wgrad
#   bash benchmarks/gpu_session.sh bench2   # gpu_batchnorm, gpu_activation_memory, gpu_plan,
#                                           # fastaccum bench (default, --compile and
#                                           # --memory-cap)
#
# Each stage builds first unless the extension is already built. Every step runs under its own
# time limit, cut to what is left of the stage's budget (GPU_SESSION_SECONDS, default 560),
# so that a slow step cannot take the rest down and the tarball is always written. Logs, the
# CSVs the scripts append to, and fastaccum bench's JSON and PNG end up in one tarball,
# $OUT/<stage>.tar.gz ($OUT defaults to ./gpu-session). FASTACCUM_COMMIT names the commit
# in the CSV rows when the tree has no .git.
set -uo pipefail

stage=${1:-}
case "$stage" in
core | test | bench1 | bench2) ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh core|test|bench1|bench2" >&2
    exit 2
    ;;
esac
out=${OUT:-gpu-session}
work="$out/$stage"
mkdir -p "$work"
export PYTHONUNBUFFERED=1
status=0

finish() {
    cp benchmarks/results/*.csv "$work/" 2>/dev/null
    tar -czf "$out/$stage.tar.gz" -C "$out" "$stage" && rm -rf "$work"
}
trap finish EXIT

budget=${GPU_SESSION_SECONDS:-560}

# step NAME SECONDS COMMAND...: run under a time limit, log to $work/NAME.log
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget - SECONDS - 10))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "== $name: skipped, ${left}s left of the stage's budget" | tee "$work/$name.log"
        status=1
        return 1
    fi
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$work/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc"
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
}

# An editable build rebuilds every extension from scratch, so a stage after the first on the
# same (still warm) machine keeps the extension it finds.
if python -c "import fastaccum._C" >/dev/null 2>&1; then
    echo "== build: kept (fastaccum._C imports)" | tee "$work/build.log"
else
    step build 300 python -m pip install --no-build-isolation --no-deps -e . || exit 1
fi
step backend 60 fastaccum info
nvidia-smi >"$work/nvidia-smi.txt" 2>&1

case "$stage" in
core)
    step gpu_wgrad 120 python benchmarks/gpu_wgrad.py
    step gpu_wrapper 150 python benchmarks/gpu_wrapper.py
    step tests_kernels 240 python -m pytest tests/cuda tests/ops tests/triton -q \
        -p no:cacheprovider -rs --durations=15 --junitxml="$work/junit-kernels.xml"
    ;;
test)
    # The kernel tests first (CUDA, the ops on every backend, Triton), then the rest, each
    # with its own report and slowest-test list, so that a step cut short by its limit
    # still leaves the other's results.
    step tests_kernels 240 python -m pytest tests/cuda tests/ops tests/triton -q \
        -p no:cacheprovider -rs --durations=15 --junitxml="$work/junit-kernels.xml"
    step tests_rest 300 python -m pytest tests -q -p no:cacheprovider -rs --durations=15 \
        --ignore=tests/cuda --ignore=tests/ops --ignore=tests/triton \
        --junitxml="$work/junit-rest.xml"
    ;;
bench1)
    step gpu_accumulate 150 python benchmarks/gpu_accumulate.py
    step gpu_wrapper 150 python benchmarks/gpu_wrapper.py
    step gpu_wrapper_short 60 python benchmarks/gpu_wrapper.py --micro-batch 1 --seq 128
    step gpu_wgrad 120 python benchmarks/gpu_wgrad.py
    ;;
bench2)
    step gpu_batchnorm 90 python benchmarks/gpu_batchnorm.py
    step gpu_activation_memory 90 python benchmarks/gpu_activation_memory.py
    step gpu_plan 90 python benchmarks/gpu_plan.py
    step bench 60 python -m fastaccum bench --device cuda --no-progress --out "$work/bench"
    step bench_compile 90 python -m fastaccum bench --device cuda --compile --no-progress \
        --out "$work/bench-compile"
    step bench_cap 90 python -m fastaccum bench --device cuda --model small --micro-batch 1 \
        --accum-steps 128 --memory-cap 0.25 --no-progress --out "$work/bench-cap"
    ;;
esac
exit "$status"
