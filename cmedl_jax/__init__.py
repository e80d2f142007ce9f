"""cmedl-jax: CMEDL (unpaired cross-modality educed distillation) in JAX/Flax.

Importing the package sets this project's XLA:CPU configuration before jax starts a backend:
XLA:CPU in jax 0.10.2 sends convolutions to YNNPACK, which made the joint step at 256x256 2.4x
slower than XLA's own convolutions (docs/PERFORMANCE.md). XLA's are used unless the user's
XLA_FLAGS already name `--xla_cpu_experimental_ynn_fusion_type` (theirs is kept). The flag is
read when jax creates its CPU backend, so import cmedl_jax before running jax computations.
It also keeps TensorFlow (TFDS, TensorBoard and the host augmentation's image transforms, which
are not oneDNN kernels) quiet: its C++ INFO lines and its oneDNN notice, unless
TF_CPP_MIN_LOG_LEVEL / TF_ENABLE_ONEDNN_OPTS are set.
"""

import os as _os

XLA_CPU_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
XLA_CPU_DEFAULT = f'{XLA_CPU_FLAG}=-individual_convolution'

if XLA_CPU_FLAG not in _os.environ.get('XLA_FLAGS', ''):
  _os.environ['XLA_FLAGS'] = f'{_os.environ.get("XLA_FLAGS", "")} {XLA_CPU_DEFAULT}'.strip()

# TensorFlow: warnings and errors only, and no oneDNN notice (TF runs no conv/matmul here).
_os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
_os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
