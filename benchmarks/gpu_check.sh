#!/usr/bin/env bash
# One run on a CUDA machine: build the kernels, the GPU tests (kernels against float64, parity with the
# official outputs on the GPU), MSDeformAttn and training-step figures. About 5-8 minutes on an H200.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results under $OUT (default gpu_out/)
#
# Uses the python on PATH (PYTHON=... to choose); needs torch with CUDA, timm, scipy, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/platform:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/gpu_check.log"; }

arch=$($PYTHON -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
log "device: $($PYTHON -c 'import torch; print(torch.cuda.get_device_name(), torch.__version__)') (sm $arch)"

log "build the CUDA extension"
start=$SECONDS
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-8} \
    $PYTHON setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
log "built in $((SECONDS - start)) s; implementations: $($PYTHON -c 'import dino_core; print(dino_core.available_implementations())')"

log "pytest -m gpu (kernels, GPU parity)"
$PYTHON -m pytest -m gpu -q -p no:cacheprovider tests/core/test_msda_kernels.py tests/core/test_parity.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -5
grep -q " passed" "$OUT/pytest_gpu.log" && ! grep -q " failed" "$OUT/pytest_gpu.log"

log "MSDeformAttn kernels, fp32 and bf16"
baseline=()  # the official kernel, where the shared GPU harness was copied to .gpu_harness/
if [ -f .gpu_harness/official_msda.py ]; then
    export PYTHONPATH="$PWD/.gpu_harness:$PYTHONPATH"; baseline=(--baseline official_msda:msda)
fi
for dtype in float32 bfloat16; do
    extra=(); [ "$dtype" = float32 ] && extra=("${baseline[@]}")
    $PYTHON benchmarks/bench_msda.py --device cuda --dtype $dtype "${extra[@]}" 2>&1 | tee "$OUT/bench_msda_$dtype.md" | tail -12
done

log "training step: fp32 / TF32 / bf16 x batch 2 / 8"
$PYTHON benchmarks/bench_step.py --json "$OUT/bench_step.json" 2>&1 | tee "$OUT/bench_step.md"
log "done in $SECONDS s"
