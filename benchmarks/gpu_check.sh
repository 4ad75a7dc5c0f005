#!/usr/bin/env bash
# The whole GPU check in one command, for a machine with an NVIDIA GPU, torch, Triton,
# ninja and pytest (no network needed):
#     make gpu-check OUT=<folder>      (or: bash benchmarks/gpu_check.sh <folder>)
# Builds the extension for this GPU, runs the GPU tests, then the kernel benchmarks, and
# leaves at most 8 files in <folder>: info.json, build.log, gpu_tests.log, bench_*.json,
# summary.txt. Budget: under 10 minutes (each stage has its own timeout).
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
log() { echo "[gpu-check $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }

log "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
log "torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)'), triton $($PY -c 'import triton; print(triton.__version__)' 2>&1)"

# Build for the GPU at hand only (fast); FORCE_CUDA makes a failed CUDA build an error.
arch=$($PY -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")')
log "build for sm_${arch/./} ..."
if ! TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" FORCE_CUDA=1 \
     timeout 300 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  log "BUILD FAILED (see build.log)"; tail -40 "$OUT/build.log"; exit 1
fi
$PY -m pyowt info > "$OUT/info.json" 2>&1
log "extension: $($PY -c 'import pyowt; e = pyowt.info()["extension"]; print("loaded" if e["loaded"] else e["reason"], "cuda" if e["with_cuda"] else "no-cuda")')"

log "GPU tests ..."
timeout 300 $PY -m pytest tests -m gpu -q -p no:cacheprovider -o addopts="-ra" > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?
log "GPU tests: $(tail -1 "$OUT/gpu_tests.log") (exit $tests_rc)"

bench_rc=0
for name in conv linear collectives; do
  file="benchmarks/test_bench_${name}.py"
  [ -f "$file" ] || { log "benchmark $file missing"; continue; }
  log "benchmark $name ..."
  PYOWT_BENCH_JSON="$OUT/bench_${name}.json" timeout 150 $PY -m pytest "$file" -q -p no:cacheprovider \
      -o addopts="" --benchmark-enable -s > "$OUT/bench_${name}.log" 2>&1 || bench_rc=1
  # Keep the table the benchmark printed in the summary (the file count is limited).
  grep -E '^\s*(layer|shape|size|#|[A-Za-z0-9_]+\s*\|)|x$|ratio' "$OUT/bench_${name}.log" | head -60 >> "$OUT/summary.txt"
  tail -3 "$OUT/bench_${name}.log" >> "$OUT/summary.txt"
  rm -f "$OUT/bench_${name}.log"
done
log "done (tests exit $tests_rc, benchmarks exit $bench_rc)"
exit $(( tests_rc != 0 || bench_rc != 0 ))
