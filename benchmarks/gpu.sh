#!/usr/bin/env bash
# The whole product and the train step's speed on one GPU, as one prepared command (issue 42):
#
#   bash benchmarks/gpu.sh [OUT_DIR] [--tiny] [STAGE ...]   # default /tmp/gpu_bench, the 3 stages
#
# On a lent GPU machine (docs/GPU.md, "How to run"): run `bash benchmarks/gpu_wheels.sh` here
# first (it fills .whl with the packages that machine lacks), carry .whl, and run
# `bash benchmarks/gpu.sh $OUT`: the script installs the wheels it finds in .whl (GPU_WHEELS) into
# /tmp/gpu_bench_site (GPU_SITE) and puts them first on PYTHONPATH.
#
# Output: OUT/machine.txt, OUT/STAGE.log per stage and OUT/figures.txt, every stage's figure lines
# (they start with 'FIG '). Data, runs and the compilation cache go to GPU_WORK (default
# /tmp/gpu_bench_work), not OUT: a device call brings back at most 8 files. Each stage runs under
# its own time limit (GPU_LIMIT_<stage>, seconds), which its commands share (a command that
# outlives it gets SIGTERM; the trainer then saves and stops); the stage still prints the figures
# of what finished. The exit status is the number of stages that failed.
#
# Default stages, in this order; their limits sum to 550 s, so that the whole run (with ~20 s
# for the wheels and machine.txt) fits one 10-minute call (timeout_s 600) on an H100. The minutes
# are estimates: the step benchmarks' from docs/GPU.md's H200 figures, the product's from CPU
# timings here (the trainer has never run on a GPU, and its steps/s there is unknown); a stage
# cut by its limit keeps what it printed, and a later call can rerun it alone with more time.
#   product   (290 s; ~4.5 min) README block 1 on the GPU: phantoms (16 + 4 patients per
#             modality), `python -m cmedl_jax.main` on configs/demo.py (64x64, 1000 steps),
#             predict and evaluate; then the same config for 3000 steps (the study's count;
#             validation every 500), predict and evaluate. Per run: compile time (the first
#             train-step call), steps/s (median of the trainer's log lines after the first),
#             validation DSC (WORKDIR/validation.json), test DSC (the evaluation's summary.json)
#             and peak device memory (memory_stats after training, from a wrapper around
#             cmedl_jax.main). The 3000-step run is the likeliest to be cut.
#   vs_torch  (130 s; ~2 min) the joint step, U-Net + CycleGAN, 256x256, batch 8, 5 timed steps:
#             JAX (benchmarks/train_step.py) and the eager PyTorch reference on the same GPU
#             (benchmarks/torch_reference.py), first at true float32 on both sides, then at TF32
#             on both sides (JAX's compile there is not known: it did not finish in 80 s on
#             2026-12-04); step times and the ratio JAX/torch. Without torch: the JAX half and
#             one line saying so.
#   study     (130 s; ~2 min) study-size runs per hour (configs/study.py: 64x64, batch 8, STEPS
#             steps; cmedl steps only): 1 process, 1 pinned to one core, 4 processes sharing the
#             GPU (timed together), then jax.vmap over 8 seeds in one process
#             (benchmarks/study_speed.py, 50 timed steps each).
# More stages (not run by default; the synthetic-batch benchmarks of the 2026-12-04 lease, whose
# limits sum to ~17 min): study_highest study_default full_highest full_default full_bf16
# study_vmap study_variants (see run_stage below).
#
# --tiny: every stage at tiny sizes with configs/tiny.py's network widths (phantoms 48x48,
# training 32x32 for 6 steps, the step benchmarks 32x32 at batch 2, the study step 3 times, 2
# processes, vmap over 2 seeds), to check the whole script on a CPU before a lease:
#   JAX_PLATFORMS=cpu bash benchmarks/gpu.sh /tmp/gpu_tiny --tiny
# 3 min 22 s on this project's 2-core AMD EPYC machine (2026-12-08, quiet): product 64 s,
# vs_torch 27 s (no torch installed), study 110 s (tests/test_gpu_script.py runs it; twice the
# GPU limits under --tiny). Needs what the product needs (requirements.txt, no TensorFlow); torch only for
# vs_torch's torch half.
set -u
OUT=/tmp/gpu_bench
if [[ $# -gt 0 && $1 != -* ]]; then
  OUT=$1
  shift
fi
TINY=0
STAGES=()
for a in "$@"; do
  case $a in
    --tiny) TINY=1 ;;
    -*) echo "gpu.sh: unknown option $a" >&2; exit 2 ;;
    *) STAGES+=("$a") ;;
  esac
done
((${#STAGES[@]})) || STAGES=(product vs_torch study)
for s in "${STAGES[@]}"; do  # A typo fails here, before any device time is spent.
  case $s in
    product | vs_torch | study | study_highest | study_default | full_highest | full_default) ;;
    full_bf16 | study_vmap | study_variants) ;;
    *) echo "gpu.sh: unknown stage $s" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
WORK=${GPU_WORK:-/tmp/gpu_bench_work}
mkdir -p "$WORK" || exit 2
WORK=$(cd "$WORK" && pwd)
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/jax_cache}
if ((TINY)) && [[ ${JAX_PLATFORMS:-} == cpu && ${XLA_FLAGS:-} != *xla_backend_optimization_level* ]]; then
  # Tiny checks the script, not speed: LLVM unoptimised, compiles about 2x faster (tests/conftest.py).
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
fi

WHEELS=${GPU_WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null &&
  ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  echo "ignoring the wheels of $WHEELS: they are for Python 3.12 (the GPU machine's), not $PY's"
elif compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=${GPU_SITE:-/tmp/gpu_bench_site}
  echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels of $WHEELS into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl || { echo "gpu.sh: installing $WHEELS failed" >&2; exit 2; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  "$PY" - <<'PY'
import importlib, importlib.metadata as md, os, sys
print('python', sys.version.split()[0], sys.executable, 'cpus', os.cpu_count())
names = ['jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'scipy', 'tensorstore',
         'ml-collections', 'nibabel', 'tensorflow-datasets', 'grain', 'array-record', 'clu',
         'tensorboard', 'tensorflow', 'tensorflow-cpu', 'torch']
versions = []
for n in names:
  try:
    versions.append(f'{n} {md.version(n)}')
  except md.PackageNotFoundError:
    versions.append(f'{n} -')
print(', '.join(versions))
import jax
print('jax devices', jax.devices())
for m in ('cmedl_jax.train', 'cmedl_jax.predict', 'cmedl_jax.evaluate', 'data_prep.phantoms'):
  try:
    importlib.import_module(m)
  except Exception as e:  # The product stage will fail on this: say why up front.
    print(f'import {m} FAILED: {type(e).__name__}: {e}')
print('tensorflow imported by the product:', 'tensorflow' in sys.modules)
try:
  import torch
  print('torch', torch.__version__, 'cuda', torch.cuda.is_available())
except ImportError:
  print('torch: not installed')
PY
} 2>&1 | tee "$OUT/machine.txt"

# ------------------------------------------------------------------------------ helpers

deadline=0
step() {  # step CMD ...: runs CMD within the stage's time left; prints its wall time.
  local left=$((deadline - $(date +%s))) t0 rc
  if ((left <= 0)); then
    echo "-- skipped (stage time limit): $*"
    return 124
  fi
  t0=$(date +%s%N)
  local shown=("${@/#*$'\n'*/CODE}")  # python -c CODE: not the code itself.
  echo "-- $(date -u +%T) ${shown[*]}"
  timeout -k 15 "$left" "$@"
  rc=$?
  t0=$((($(date +%s%N) - t0) / 100000000))
  echo "-- exit $rc after $((t0 / 10)).$((t0 % 10)) s: ${shown[*]:0:3}"
  return $rc
}

# python -c MAIN_WRAPPER FLAGS...: `python -m cmedl_jax.main FLAGS...` (absl app.run of
# cmedl_jax.main.main, as tests/test_multihost.py's _LATE_MAIN), then one line: the first
# train-step call's time (tracing and compiling, the run's first step), all XLA compiles, and
# the device's peak memory (memory_stats; none on CPU).
MAIN_WRAPPER=$(
  cat <<'PY'
import time
from absl import app
import jax
from jax import monitoring
from cmedl_jax import main, sharding

compiles, first = [], {}
def on_duration(event, duration, **kwargs):
  if event == '/jax/core/compile/backend_compile_duration':
    compiles.append(duration)
monitoring.register_event_duration_secs_listener(on_duration)
call = sharding.Together.__call__
def timed(self, *args):
  if self.name in first:
    return call(self, *args)
  t0 = time.perf_counter()
  out = call(self, *args)
  first[self.name] = time.perf_counter() - t0
  return out
sharding.Together.__call__ = timed
try:
  app.run(main.main)
finally:
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  limit = stats.get('bytes_limit')
  memory = (
    f'{peak / 2**30:.3f} GiB (of {limit / 2**30:.1f})' if peak else f'n/a ({device.platform}: no memory_stats)'
  )
  print(
    f'gpu.sh train: first train step {first.get("train_step", float("nan")):.1f} s; '
    f'XLA compiles {sum(compiles):.1f} s in {len(compiles)} programs; peak device memory '
    f'{memory}; device {device.device_kind}',
    flush=True,
  )
PY
)

# figures NAME WORKDIR LOG EVALDIR: the 'FIG product NAME' lines of one run.
figures() {
  "$PY" - "$@" <<'PY'
import json, math, os, re, statistics, sys

name, workdir, log, evaldir = sys.argv[1:5]
text = open(log, errors='replace').read() if os.path.exists(log) else ''
say = lambda s: print(f'FIG product {name}: {s}', flush=True)
m = re.search(r'gpu.sh train: first train step ([\d.na]+) s; XLA compiles ([\d.]+) s in (\d+)', text)
say(f'compile {m.group(1)} s (first train-step call), XLA compiles {m.group(2)} s in {m.group(3)} '
    'programs' if m else 'compile n/a (no wrapper line in the log)')
rates = re.findall(r'step (\d+)/(\d+)\s+([\d.]+) steps/s', text)
if len(rates) > 1:
  say(f'steps/s {statistics.median(float(r[2]) for r in rates[1:]):.2f} (median of '
      f'{len(rates) - 1} log intervals after the first; last logged step {rates[-1][0]}/{rates[-1][1]})')
else:
  say(f'steps/s n/a ({len(rates)} log lines)')
path = os.path.join(workdir, 'validation.json')
history = json.load(open(path)) if os.path.exists(path) else []
if history:
  last = history[-1]
  best = max(history, key=lambda r: r['val_dsc'] if math.isfinite(r['val_dsc']) else -1)
  teacher = last.get('val_teacher_dsc')
  say(f'validation DSC {last["val_dsc"]:.3f} at step {last["step"]} (best {best["val_dsc"]:.3f} '
      f'at {best["step"]})' + (f'; teacher {teacher:.3f}' if teacher is not None else ''))
else:
  say('validation DSC n/a (no validation.json)')
path = os.path.join(evaldir, 'summary.json')
if os.path.exists(path):
  summary = json.load(open(path))
  for section in ('per_case', 'per_tumor'):
    for r in summary.get(section) or []:
      if r.get('metric') == 'dice':
        mean, sd = (float('nan') if r[k] is None else float(r[k]) for k in ('mean', 'sd'))
        say(f'test DSC {section.replace("_", " ")} {r["class"]}: {mean:.3f} +- {sd:.3f} '
            f'(n {r["n"]}, {r["n_inf"]} with one mask empty)')
  for r in summary.get('detection') or []:
    say(f'test detection {r["class"]}: {r["n_detected"]} of {r["n_tumors"]} tumors, '
        f'{r["n_fp_components"]} false-positive components')
else:
  say('test DSC n/a (no evaluation summary.json)')
m = re.search(r'peak device memory (.*?); device (.*)', text)
say(f'peak device memory {m.group(1)} on {m.group(2)}' if m else 'peak device memory n/a')
PY
}

# ------------------------------------------------------------------------------ stages

stage_product() {
  local P=$WORK/product rc=0 kind pids=() d ph cfg demo gpu run steps
  d=$P/data
  rm -rf "$P/runs"
  mkdir -p "$P/runs"
  ph=(--n 16 --seed 0)
  ((TINY)) && ph=(--n 5 --n-test 1 --seed 0 --size 48 --spacing 8 --slices 6)
  for kind in thorax_ct thorax_t2w; do
    if [[ -f $d/phantoms/$kind/dataset.json && -f $d/phantoms/$kind.args &&
      $(cat "$d/phantoms/$kind.args") == "${ph[*]}" ]]; then
      echo "-- phantoms $kind: kept from an earlier call"
    else
      rm -rf "$d/phantoms/$kind" "$d/prepared"
      (step "$PY" -m data_prep.phantoms --kind "$kind" "${ph[@]}" --out "$d/phantoms/$kind" &&
        echo "${ph[*]}" >"$d/phantoms/$kind.args") &
      pids+=($!)
    fi
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  ((rc == 0)) || return $rc
  cfg=(--config=configs/demo.py
    "--config.data.source.raw_dir=$d/phantoms/thorax_ct"
    "--config.data.source.prepared_dir=$d/prepared/thorax_ct"
    "--config.data.target.raw_dir=$d/phantoms/thorax_t2w"
    "--config.data.target.prepared_dir=$d/prepared/thorax_t2w")
  demo=()
  gpu=(--config.train.num_steps=3000 --config.train.eval_every=500
    --config.train.checkpoint_every=1000 --config.train.image_every=1000 --config.train.log_every=100)
  if ((TINY)); then
    cfg+=(--config.data.image_size=32 --config.data.spacing_mm=12 --config.train.log_every=2
      --config.model.student.base_width=4 --config.model.teacher.base_width=4
      --config.model.translator.ngf=4 --config.model.discriminator.ndf=4
      --config.train.image_every=6 --config.train.checkpoint_every=3 --config.eval.batch_size=8)
    demo=(--config.train.num_steps=6 --config.train.eval_every=3)
    gpu=(--config.train.num_steps=6 --config.train.eval_every=6)  # The same program: cached.
  fi
  for run in demo gpu; do
    local r=$P/runs/$run extra
    if [[ $run == demo ]]; then extra=("${demo[@]}"); else extra=("${gpu[@]}"); fi
    echo "-- run $run: configs/demo.py ${extra[*]}"
    step "$PY" -c "$MAIN_WRAPPER" "${cfg[@]}" "${extra[@]}" --workdir="$r" 2>&1 |
      tee "$P/$run.train.log"
    ((PIPESTATUS[0] == 0)) || rc=1
    if [[ -d $r/export ]]; then
      step "$PY" -m cmedl_jax.predict --workdir="$r" --input="$d/phantoms/thorax_ct/imagesTs" \
        --output="$r/predictions" || rc=1
      step "$PY" -m cmedl_jax.evaluate --pred="$r/predictions" --ref="$d/phantoms/thorax_ct/labelsTs" \
        --images="$d/phantoms/thorax_ct/imagesTs" --classes="$d/phantoms/thorax_ct/dataset.json" \
        --out="$r/evaluation" || rc=1
    else
      echo "-- run $run: no export (training did not finish): no predict, evaluate"
    fi
    figures "$run" "$r" "$P/$run.train.log" "$r/evaluation"
  done
  return $rc
}

stage_vs_torch() {
  local rc=0 p args=(--size 256 --batch 8 --pairs unet:cyclegan --steps 5)
  ((TINY)) && args=(--size 32 --batch 2 --pairs unet:cyclegan --steps 2 --config tiny --no-peak)
  if ! "$PY" -c 'import torch' 2>/dev/null; then
    echo 'FIG vs_torch: torch is not installed: the JAX half only, no jax/torch ratio'
  fi
  for p in highest default; do
    step "$PY" -m benchmarks.train_step "${args[@]}" --precision "$p" 2>&1 | tee "$WORK/vs_torch.$p.log"
    ((PIPESTATUS[0] == 0)) || rc=1
    grep -E '^(jax step|jax/torch) ' "$WORK/vs_torch.$p.log" | sed 's/^/FIG vs_torch: /'
    grep -q '^jax step ' "$WORK/vs_torch.$p.log" || rc=1
  done
  return $rc
}

stage_study() {  # K processes first, then jax.vmap (its compile time on a GPU is not known).
  local rc=0 args=(--flags jax_default --no-parts --no-variants --methods cmedl --steps 50) k=4 s=8
  if ((TINY)); then
    args=(--flags jax_default --no-parts --no-variants --methods cmedl --steps 3 --no-peak
      --set data.image_size=32 --set train.global_batch_size=2 --networks tiny)
    k=2 s=2
  fi
  step "$PY" -m benchmarks.study_speed "${args[@]}" --vmap none --concurrent $k 2>&1 |
    tee "$WORK/study.concurrent.log"
  ((PIPESTATUS[0] == 0)) || rc=1
  grep -E '^runs/hour ' "$WORK/study.concurrent.log" | sed 's/^/FIG study: /'
  grep -q "^runs/hour $k processes at once: [0-9]" "$WORK/study.concurrent.log" || rc=1
  step "$PY" -m benchmarks.study_speed "${args[@]}" --vmap $s --no-peak 2>&1 | tee "$WORK/study.vmap.log"
  ((PIPESTATUS[0] == 0)) || rc=1
  grep -E '^runs/hour jax.vmap ' "$WORK/study.vmap.log" | sed 's/^/FIG study: /'
  grep -q "^runs/hour jax.vmap x$s seeds" "$WORK/study.vmap.log" || rc=1
  return $rc
}

# The 2026-12-04 lease's synthetic-batch benchmarks (docs/GPU.md).
study=("$PY" -m benchmarks.study_speed --flags jax_default --no-parts --steps 20)
full=("$PY" -m benchmarks.train_step --size 256 --batch 8 --pairs unet:cyclegan --no-torch --steps 5)
if ((TINY)); then
  study=("$PY" -m benchmarks.study_speed --flags jax_default --no-parts --steps 2 --no-peak
    --set data.image_size=32 --set train.global_batch_size=2 --networks tiny)
  full=("$PY" -m benchmarks.train_step --size 32 --batch 2 --pairs unet:cyclegan --no-torch --steps 2
    --config tiny --no-peak)
fi
highest=(env JAX_DEFAULT_MATMUL_PRECISION=highest)
run_stage() {  # run_stage NAME: its log in OUT/NAME.log; returns its exit status.
  local limit cmd=() rc
  case $1 in
    product) limit=290 ;;
    vs_torch) limit=130 ;;
    study) limit=130 ;;
    study_highest) limit=180 cmd=("${highest[@]}" "${study[@]}" --no-full --vmap none --concurrent 4) ;;
    study_default) limit=120 cmd=("${study[@]}" --no-full --vmap none) ;;
    full_highest) limit=120 cmd=("${highest[@]}" "${full[@]}") ;;
    full_default) limit=150 cmd=("${full[@]}") ;;
    full_bf16) limit=150 cmd=("${full[@]}" --dtype bfloat16) ;;
    study_vmap) limit=240 cmd=("${study[@]}" --no-variants --vmap 8,32) ;;
    study_variants) limit=240 cmd=("${study[@]}" --vmap none) ;;
  esac
  ((TINY)) && limit=$((2 * limit))  # A loaded 2-core CPU compiles slower than the GPU machine.
  local var=GPU_LIMIT_$1
  limit=${!var:-$limit}
  deadline=$(($(date +%s) + limit))
  echo "== $1 ($(date -u +%T), limit ${limit} s$( ((TINY)) && echo ', tiny'))"
  if ((${#cmd[@]})); then
    step "${cmd[@]}"
  else
    "stage_$1"
  fi
  rc=$?
  echo "== $1: exit $rc ($(date -u +%T))"
  return $rc
}

failed=0
for s in "${STAGES[@]}"; do
  run_stage "$s" 2>&1 | tee "$OUT/$s.log"
  ((PIPESTATUS[0] == 0)) || failed=$((failed + 1))
done
for s in "${STAGES[@]}"; do grep -h '^FIG ' "$OUT/$s.log"; done >"$OUT/figures.txt"
echo "== figures (OUT/figures.txt; $failed of ${#STAGES[@]} stages failed):"
cat "$OUT/figures.txt"
exit "$failed"
