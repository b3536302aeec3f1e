#!/usr/bin/env bash
# The GPU check as one command for a GPU machine lent for a few minutes (at most 10 per command, 15 in all):
# build the extension against that machine's own torch, then run benchmarks/gpu_check.py, everything inside
# TOTAL_S seconds (default 500), results under $OUT (gpu_check.json, rewritten after every step, and the logs).
#
#   bash benchmarks/gpu_check_device.sh                 # from the repository root; OUT defaults to /tmp/gpu_check
#
# It needs no network and no pip (such machines reach nothing outside and their setuptools may be older than
# pyproject.toml's): cmake builds netmerge_fast._C in place, CUDA sources for sm_90 included, and the checkout
# goes on PYTHONPATH with triton_kernels linked where the installed package has it. If the build fails the
# check still runs, on the Triton and torch backends, and says so in its versions.
# Knobs: PYTHON (python3), TOTAL_S, CUDA_ARCHS (90), NETMERGE_WITH_CUDA (ON), GPU_CHECK_ARGS (extra arguments).
set -u
start=$SECONDS
total=${TOTAL_S:-500}
out=${OUT:-/tmp/gpu_check}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1

build=build/gpu-check
prefix=$("$py" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
configure=(cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "-DCMAKE_PREFIX_PATH=$prefix"
           "-DPython_EXECUTABLE=$(command -v "$py")" "-DNETMERGE_OUTPUT_DIR=$PWD/netmerge_fast"
           "-DNETMERGE_WITH_CUDA=${NETMERGE_WITH_CUDA:-ON}" "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-90}")
if timeout 240 "${configure[@]}" > "$out/build.log" 2>&1 &&
   timeout $((240 - (SECONDS - start))) cmake --build "$build" -j "$(nproc)" >> "$out/build.log" 2>&1; then
    echo "built netmerge_fast._C in $((SECONDS - start)) s"
else
    echo "build failed or timed out after $((SECONDS - start)) s (the check runs without the extension):"
    tail -40 "$out/build.log"
fi
ln -sfn ../triton_kernels netmerge_fast/triton_kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# --budget-s stops starting new cases 90 s before the hard stop; timeout is the hard stop.
left=$((total - (SECONDS - start)))
# shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of arguments
timeout "$left" "$py" benchmarks/gpu_check.py --json "$out/gpu_check.json" --budget-s $((left - 90)) \
    --tests-timeout-s $((left / 3)) ${GPU_CHECK_ARGS:-} 2>&1 | tee "$out/gpu_check.log"
status=${PIPESTATUS[0]}
echo "gpu_check exit status $status; $((SECONDS - start)) s in all"
exit "$status"
