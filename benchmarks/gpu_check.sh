#!/usr/bin/env bash
# The GPU check, for a bare lent GPU machine (see DEVELOPERS.md): builds the extension against
# the torch installed there, runs the CUDA tests and every benchmark on the GPU, and writes logs
# and JSON under $OUT. Budget: under 8 minutes in all.
#   device run:  bash benchmarks/gpu_check.sh   (the device tool sets $OUT)
# Elsewhere $OUT defaults to runs/gpu_check (git-ignored): a run leaves the tree as it was, and its
# results are committed by copying them to benchmarks/results/gpu/.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/runs/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# The emulator is built too: its results on the same inputs are compared with the GPU's.
export PYSSL_CUDA=ON PYSSL_CUDA_EMULATE=ON PYSSL_CUDA_ARCH=${PYSSL_CUDA_ARCH:-90} CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
export PYTHONUNBUFFERED=1

# The anchor libraries (lightly, kornia, open_clip) are not on the GPU image and it has no
# network: carry their wheels in .whl/ (device `carry: [".whl"]`), fetched here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl lightly==1.6.0 \
#       hydra-core omegaconf antlr4-python3-runtime kornia==0.9.0 kornia-rs open-clip-torch==3.3.0 ftfy wcwidth
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$REPO"/.whl/*.whl &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# At most 8 files come back from a device run: one log for set-up and tests, one for the
# benchmarks, a JSON per kernel benchmark and the GPU-against-emulator comparison.
{ nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } >"$OUT/check.log" 2>&1

start=$(date +%s)
if ! "$PY" -m pip install --no-build-isolation --no-deps -q "$REPO" -Cbuild-dir=/tmp/pyssl-build >>"$OUT/check.log" 2>&1; then
  tail -40 "$OUT/check.log"
  echo "BUILD FAILED"
  exit 1
fi
echo "build: $(($(date +%s) - start)) s"
# The SASS model's predictions for the kernels just built, beside the timings below.
timeout 60 "$PY" "$REPO/benchmarks/sass_model.py" --objects "/tmp/pyssl-build/CMakeFiles/_C.dir/csrc/**/*.cu.o" \
  --out "$OUT/sass_model.json" >>"$OUT/check.log" 2>&1 || echo "sass_model: failed (see check.log)"

# Run from outside the source tree so the installed package is the one imported.
cd /tmp
# Every CUDA test (the "cuda" half of the backend-parametrised tests), none stopping the run.
timeout 200 "$PY" -m pytest -q -m cuda -rf --durations=10 "$REPO/tests" -p no:cacheprovider >/tmp/cuda_tests.log 2>&1
echo "cuda tests: exit $? after $(($(date +%s) - start)) s"; grep -E "^FAILED|passed|failed" /tmp/cuda_tests.log | tail -25
cat /tmp/cuda_tests.log >>"$OUT/check.log"

# The same kernel sources on the GPU and on the CPU emulator, same inputs.
timeout 60 "$PY" "$REPO/benchmarks/gpu_vs_emulator.py" --out "$OUT/gpu_vs_emulator.json" >/tmp/gpu_vs_emu.log 2>&1
echo "gpu vs emulator: exit $?"; tail -3 /tmp/gpu_vs_emu.log
cat /tmp/gpu_vs_emu.log >>"$OUT/check.log"

# Memory and race checks of the kernels on small cases, where compute-sanitizer is installed.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -n "$SANITIZER" ]; then
  for tool in memcheck racecheck; do
    timeout 45 "$SANITIZER" --tool "$tool" --error-exitcode 9 "$PY" -m pytest -q -x -m cuda -p no:cacheprovider \
      "$REPO/tests/test_infonce_cuda.py" -k "(1, 300) or (97, 7) or gradcheck" >/tmp/sanitizer.log 2>&1
    echo "compute-sanitizer $tool: exit $? (9: errors found)"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY" /tmp/sanitizer.log | tail -2
    cat /tmp/sanitizer.log >>"$OUT/check.log"
  done
else
  echo "compute-sanitizer: not installed here" | tee -a "$OUT/check.log"
fi

# The trainer end to end on the GPU (AMP, cudnn, the fused losses inside real methods): one epoch each.
for method in simclr mocov2 clip; do
  timeout 60 "$PY" -m pyssl train --method "$method" --epochs 1 --device cuda --amp --no-progress \
    --no-tensorboard --out "/tmp/gpu_run_$method" >/tmp/train.log 2>&1
  echo "train $method (cuda, amp): exit $? after $(($(date +%s) - start)) s"; tail -2 /tmp/train.log
  cat /tmp/train.log >>"$OUT/check.log"
done

# The kernel benchmarks (bench_metric.py is plain PyTorch: left out to keep the 8-minute budget).
for name in bench_infonce bench_clip bench_moco bench_ema bench_augment; do
  bench="$REPO/benchmarks/$name.py"
  timeout 75 "$PY" "$bench" --device cuda --min-time 1 --out "$OUT/${name}_cuda.json" >/tmp/bench.log 2>&1
  rc=$?
  cat /tmp/bench.log >>"$OUT/benchmarks.log"
  echo "$name: exit $rc"; grep -vE "^(wrote|\s*$)" /tmp/bench.log | tail -12
done
# The older WMMA tensor-core kernels of the InfoNCE family (PYSSL_INFONCE_KERNELS=wmma) on the
# same sizes, to set against the mma.sync kernels timed above: numbers in benchmarks.log only
# (the file count that comes back is used up).
for name in bench_infonce bench_clip; do
  echo "== $name with PYSSL_INFONCE_KERNELS=wmma (the older tensor-core kernels) ==" >>"$OUT/benchmarks.log"
  PYSSL_INFONCE_KERNELS=wmma timeout 60 "$PY" "$REPO/benchmarks/$name.py" --device cuda --min-time 0.5 \
    --out /tmp/${name}_wmma.json >/tmp/bench.log 2>&1
  rc=$?
  cat /tmp/bench.log >>"$OUT/benchmarks.log"
  echo "$name (wmma kernels): exit $rc"; grep -vE "^(wrote|\s*$)" /tmp/bench.log | tail -6
done
# CLIP's backward before wide_grad_kernel (bf16 rows of 129-512 features in 128-feature chunks,
# S recomputed per chunk): PYSSL_INFONCE_KERNELS=chunked, benchmarks.log only.
echo "== bench_clip with PYSSL_INFONCE_KERNELS=chunked (the chunked backward) ==" >>"$OUT/benchmarks.log"
PYSSL_INFONCE_KERNELS=chunked timeout 60 "$PY" "$REPO/benchmarks/bench_clip.py" --device cuda --min-time 0.5 \
  --out /tmp/bench_clip_chunked.json >/tmp/bench.log 2>&1
rc=$?
cat /tmp/bench.log >>"$OUT/benchmarks.log"
echo "bench_clip (chunked backward): exit $rc"; grep -vE "^(wrote|\s*$)" /tmp/bench.log | tail -6
# MoCo's SIMT sweep (PYSSL_MOCO_KERNELS=simt) on bench_moco's sizes, against the tensor-core
# sweep timed above (its bf16-queue configs): benchmarks.log only.
echo "== bench_moco with PYSSL_MOCO_KERNELS=simt (the SIMT sweep) ==" >>"$OUT/benchmarks.log"
PYSSL_MOCO_KERNELS=simt timeout 60 "$PY" "$REPO/benchmarks/bench_moco.py" --device cuda --min-time 0.5 \
  --out /tmp/bench_moco_simt.json >/tmp/bench.log 2>&1
rc=$?
cat /tmp/bench.log >>"$OUT/benchmarks.log"
echo "bench_moco (SIMT sweep): exit $rc"; grep -vE "^(wrote|\s*$)" /tmp/bench.log | tail -6
echo "total: $(($(date +%s) - start)) s"
