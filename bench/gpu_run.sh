#!/usr/bin/env bash
# The one script run on the GPU machine (through the device tool), from the repository root:
#   GPU tests at realistic sizes, the same tests once under compute-sanitizer memcheck, and the
#   benchmark. Logs and results go to $OUT (default: bench/results/run). Short summary last.
#
# Environment: STAGES (default "tests sanitizer bench"; also "cache", "ncu" and "fibuild"), BENCH_ARGS (extra bench_gpu.py flags),
# OUT, and per-stage time limits T_TESTS / T_SAN / T_BENCH (seconds). Wheels in .whl/ (flashinfer-python, apache-tvm-ffi) are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/run}
STAGES=${STAGES:-"tests sanitizer bench"}
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 FLASHINFER_CUDA_ARCH_LIST=9.0a
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/fiws}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# (at most 8 files come back from $OUT: keep logs few)
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/install.log 2>&1 || { cat /tmp/install.log; exit 1; }
# FlashInfer compiles its kernels with nvcc on first use (minutes). Modules built once (stage
# "fibuild", which returns them in $OUT) are carried in .fiaot/<name>/<name>.so and placed in
# FlashInfer's AOT directory, which it loads without asking ninja (a carried ninja cache was
# rebuilt anyway: bench/NOTES.md, v4).
if [ -d .fiaot ] && [ -d /tmp/site/flashinfer ]; then
  mkdir -p /tmp/site/flashinfer/data/aot && cp -r .fiaot/. /tmp/site/flashinfer/data/aot/
fi
FI_PID=
if [[ " $STAGES " == *" fibuild "* ]]; then
  timeout "${T_FI:-560}" python3 bench/bench_gpu.py --warm-flashinfer-only --dtypes float32 --out /tmp/fiwarm >/tmp/fiwarm.log 2>&1 &
  FI_PID=$!
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

summary=()
if [[ " $STAGES " == *" tests "* ]]; then
  t0=$SECONDS
  timeout "${T_TESTS:-480}" python3 -m pytest tests/test_triton_gpu.py tests/test_torch_cuda.py tests/test_cache.py -q -p no:cacheprovider -rfE \
    2>&1 | tee "$OUT/tests.log"
  summary+=("tests: $(tail -n 1 "$OUT/tests.log") ($((SECONDS - t0)) s)")
fi
if [[ " $STAGES " == *" cache "* ]]; then
  t0=$SECONDS
  # the request-cache benchmark, torch then triton backend (writes cache_<backend>_cuda.json)
  for be in torch triton; do
    timeout "${T_CACHE:-150}" python3 bench/bench_cache.py --backend $be --device cuda --batch 64 --steps 5 --out "$OUT" 2>&1
  done | tee "$OUT/cache.log"
  summary+=("cache bench: $((SECONDS - t0)) s")
fi
if [[ " $STAGES " == *" sanitizer "* ]]; then
  t0=$SECONDS
  # No caching allocator: each tensor is its own allocation, so memcheck sees every overrun.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 SAMPLING_GPU_SMALL=1 timeout "${T_SAN:-240}" compute-sanitizer --tool memcheck --error-exitcode 9 \
    --target-processes application-only python3 -m pytest tests/test_triton_gpu.py -q -p no:cacheprovider -rfE \
    >"$OUT/sanitizer.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/sanitizer.log"
  summary+=("sanitizer (memcheck) rc=$rc: $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitizer.log" | tail -n 2 | tr '\n' ' ') ($((SECONDS - t0)) s)")
fi
if [[ " $STAGES " == *" ncu "* ]]; then
  t0=$SECONDS
  # Nsight Compute on the second call of each scenario (NCU_ARGS: bench/ncu_calls.py flags)
  timeout "${T_NCU:-240}" ncu --clock-control none --kernel-name regex:"_prep|_scan|_finish|_fallback" \
    --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section LaunchStats --page details \
    python3 bench/ncu_calls.py ${NCU_ARGS:-} >"$OUT/ncu.log" 2>&1
  summary+=("ncu rc=$?: $((SECONDS - t0)) s")
fi
if [[ " $STAGES " == *" bench "* ]]; then
  t0=$SECONDS
  FLASHINFER_DISABLE_JIT=${FLASHINFER_DISABLE_JIT:-1} timeout "${T_BENCH:-400}" python3 bench/bench_gpu.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -v "^|"
  summary+=("bench: $((SECONDS - t0)) s")
fi
if [ -n "$FI_PID" ]; then
  t0=$SECONDS; wait "$FI_PID"; echo "flashinfer build rc=$? (waited $((SECONDS - t0)) s):"; cat /tmp/fiwarm.log
  for so in $(find "$FLASHINFER_WORKSPACE_BASE" -name "*.so"); do cp "$so" "$OUT/"; done
  summary+=("flashinfer modules built: $(cd "$OUT" && ls *.so 2>/dev/null | tr '\n' ' ')")
fi
echo "================ summary ================"
printf '%s\n' "${summary[@]}"
[ -f "$OUT/gpu_bench.md" ] && grep -E "^\| (float32|bfloat16) \| (1|256|1024) \| 151936 \| S[1-4] \| (one read|ours|flashinfer top_k_top_p \(int|flashinfer sampling)" "$OUT/gpu_bench.md"
exit 0
