#!/usr/bin/env bash
# The Python packages that a lent GPU machine lacks, as wheels in DIR (default .whl), for
# benchmarks/gpu.sh, which installs them there (docs/GPU.md, "How to run"). Run it on a machine
# with internet access (nothing can be downloaded on the GPU machine):
#
#   bash benchmarks/gpu_wheels.sh [DIR]      # and once: echo /.whl/ >> .git/info/exclude
#
# The GPU machine (the workplace's 'cuda' image) has Python 3.12, jax 0.11.2 with its CUDA
# plugin, flax, optax, orbax-checkpoint, tensorstore, numpy, scipy, tensorboard, matplotlib,
# absl-py, etils, protobuf, pyarrow, psutil, requests, tqdm, wrapt, cloudpickle, pyyaml and torch
# among others. MISSING is what this project needs beyond them: requirements.txt's
# tensorflow-datasets, grain, clu, ml-collections and nibabel, and the dependencies of those that
# the image lacks, at the versions the project's CPU venv resolved. The list was found by
# installing these wheels (--no-deps) into a Python 3.12 venv holding only the image's packages
# (jax 0.11.2 on CPU) and running the product there (`bash benchmarks/gpu.sh OUT --tiny product`).
# PINNED are this project's pins of packages the image has in versions of its own, which the
# 2026-12-04 lease carried too (GPU_WHEELS_PINNED=0 leaves them out).
#
# cp312 manylinux x86_64 wheels, dependencies not resolved (--no-deps): exactly these. promise
# 2.3 has no wheel on PyPI (source only, pure Python): it is built here with `pip wheel`. At the
# end the script prints the sizes and checks the working tree that a device call carries
# (tracked and untracked-not-ignored files, DIR left out) plus DIR against the 64 MiB a call may
# carry: exit 1 if over.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
MISSING=(
  tensorflow-datasets==4.9.10 array-record==0.8.6 dm-tree==0.1.10 immutabledict==4.3.1
  simple-parsing==0.1.9 docstring-parser==0.18.0 tensorflow-metadata==1.21.0
  googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2
  grain==0.2.18 portpicker==1.6.0
  clu==0.0.12 ml-collections==1.1.0 nibabel==5.4.2 importlib-resources==7.1.0
)
SOURCE_ONLY=(promise==2.3)
PINNED=(flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8)
[[ ${GPU_WHEELS_PINNED:-1} == 0 ]] && PINNED=()
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p "$DIR"
rm -f "$DIR"/*.whl
failed=()
for pkg in "${MISSING[@]}" "${PINNED[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DIR" "$pkg" || failed+=("$pkg")
done
for pkg in "${SOURCE_ONLY[@]}"; do
  "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$DIR" "$pkg" || failed+=("$pkg")
done
if ((${#failed[@]})); then
  echo "gpu_wheels.sh: no cp312 manylinux wheel could be fetched for: ${failed[*]}" >&2
  echo "  (this machine's pip index may lack them; a machine that reaches pypi.org has them)" >&2
  exit 1
fi
ls -l "$DIR"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
wheels=$(cat "$DIR"/*.whl | wc -c)
tree=$(git ls-files -co --exclude-standard -z | grep -zv "^${DIR#./}/" |
  du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
limit=$((64 * 1024 * 1024))
echo "wheels $(ls "$DIR"/*.whl | wc -l) files, $((wheels / 1024)) KiB; working tree $((tree / 1024)) KiB;" \
  "together $(((wheels + tree) / 1024)) KiB of the $((limit / 1024)) KiB a device call carries"
if ((wheels + tree > limit)); then
  echo "gpu_wheels.sh: over the 64 MiB limit" >&2
  exit 1
fi
