#!/usr/bin/env bash
# The train step's speed on one GPU, from the existing benchmarks (docs/GPU.md has the figures):
#
#   bash benchmarks/gpu.sh [OUT_DIR [STAGE ...]]   # default /tmp/gpu_bench, all stages
#
# Each stage runs under a time limit, so that a short lease still returns what finished; its
# log lands in OUT_DIR/STAGE.log. Stages, in order (the limits sum to ~17 min: give a 10-minute
# lease a subset):
#   study_highest  the study-size step (configs/study.py: 64x64, batch 8; cmedl, student_only) at
#                  JAX_DEFAULT_MATMUL_PRECISION=highest (true float32), then 4 such processes at
#                  once sharing the GPU, one per CPU core (benchmarks/study_speed.py)
#   study_default  the same at JAX's default matmul precision (TF32 on recent NVIDIA GPUs)
#   full_highest   the full-size joint step (configs/cmedl.py, U-Net + CycleGAN, 256x256, batch 8)
#                  in float32 at highest precision (benchmarks/train_step.py)
#   full_default   the same at the default precision
#   full_bf16      the same in bfloat16
#   study_vmap     jax.vmap of the study-size cmedl step over 8 and 32 seeds
#   study_variants the study-size step's code variants (batch 32 among them)
#
# Needs jax with a GPU backend, flax, optax, ml_collections, nibabel, numpy, scipy; not
# TensorFlow (these benchmarks use synthetic batches, not the input pipeline).
set -u
OUT=${1:-/tmp/gpu_bench}
shift || true
STAGES=${*:-study_highest study_default full_highest full_default full_bf16 study_vmap study_variants}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/gpu_bench_jax_cache}
(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())') 2>&1 | tee "$OUT/machine.txt"

study=(python3 benchmarks/study_speed.py --flags jax_default --no-parts --steps 20)
full=(python3 benchmarks/train_step.py --size 256 --batch 8 --pairs unet:cyclegan --no-torch --steps 5)
highest=(env JAX_DEFAULT_MATMUL_PRECISION=highest)
run_stage() {  # run_stage NAME
  local limit cmd
  case $1 in
    study_highest) limit=180 cmd=("${highest[@]}" "${study[@]}" --no-full --vmap none --concurrent 4) ;;
    study_default) limit=120 cmd=("${study[@]}" --no-full --vmap none) ;;
    full_highest) limit=120 cmd=("${highest[@]}" "${full[@]}") ;;
    full_default) limit=150 cmd=("${full[@]}") ;;
    full_bf16) limit=150 cmd=("${full[@]}" --dtype bfloat16) ;;
    study_vmap) limit=240 cmd=("${study[@]}" --no-variants --vmap 8,32) ;;
    study_variants) limit=240 cmd=("${study[@]}" --vmap none) ;;
    *) echo "unknown stage $1" >&2; return 2 ;;
  esac
  echo "== $1 ($(date -u +%T), limit ${limit} s): ${cmd[*]}"
  timeout "$limit" "${cmd[@]}" 2>&1 | tee "$OUT/$1.log"
  echo "== $1: exit ${PIPESTATUS[0]} ($(date -u +%T))"
}
for s in $STAGES; do run_stage "$s"; done
