r"""The test-time network as a portable artifact: StableHLO via `jax.export`, loadable without
this package (jax and numpy alone), beside a JSON of how its input slices are prepared.

  python -m cmedl_jax.portable --workdir RUN            # RUN/export -> RUN/portable/
  python -m cmedl_jax.portable --checkpoint RUN/best/400 --out DIR

Writes (atomically) PORTABLE/network.jax_export: float32 slices [B, H, W, C] in [-1, 1] (B any,
H and W any multiples of 32: symbolic dimensions, so the whole field of view goes through as
the Predictor sends it; only PSPNet, whose pyramid pooling needs static sizes, takes the
training size alone; C = context slices) -> softmax probabilities [B, H, W, K],
weights inside, lowered for CPU and CUDA; and PORTABLE/preparation.json: the data preparation
(modality, in-plane spacing in mm, size, CT window in HU or MRI percentiles, orientation,
interpolation), the classes, the context slices and the shapes. Training writes RUN/portable at
its end. To run it (no cmedl_jax needed; `slices` prepared as preparation.json says, e.g. by
`data_prep.prepare.prepare_volume` and `cmedl_jax.inference.context_stack`):

  from jax import export
  network = export.deserialize(open('RUN/portable/network.jax_export', 'rb').read())
  probabilities = network.call(slices)   # numpy float32 [B, H, W, C] -> [B, H, W, K]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from cmedl_jax import checkpoint
from cmedl_jax import inference
from cmedl_jax import method
from data_prep import files
from data_prep import prepare

NETWORK = 'network.jax_export'
ONNX = 'network.onnx'
ONNX_TOLERANCE = 1e-4  # Largest |onnxruntime - jax| probability accepted at export.
PREPARATION = 'preparation.json'
PLATFORMS = ('cpu', 'cuda')
FORMAT_VERSION = 2  # 2: symbolic H and W (whole field of view)


def probabilities_fn(config, params, batch_stats, test_time, channels):
  """slices [b, H, W, C] -> softmax probabilities [b, H, W, K] of network `test_time`
  (method.test_time_variables), the variables closed over (constants when traced)."""
  nets = method.build_networks(config, in_channels=channels)
  params, batch_stats = jax.device_get((params, batch_stats))

  def probabilities(x):
    logits = method.infer_logits(params, batch_stats, x, nets=nets, test_time=test_time)
    return jax.nn.softmax(logits.astype(jnp.float32), -1)

  return probabilities


def export_network(probabilities, image_shape):
  """jax.export.Exported of `probabilities` (probabilities_fn) on float32 [b, h, w, C].

  image_shape: (H, W, C) of the training slices. h and w are symbolic multiples of
  prepare.WHOLE_FOV_MULTIPLE, or H and W when the network needs static sizes.
  """
  h, w, c = image_shape
  export = jax.export.export(jax.jit(probabilities), platforms=PLATFORMS)
  m = prepare.WHOLE_FOV_MULTIPLE
  try:
    return export(_float32(f'b, {m}*h, {m}*w, {c}'))
  except TypeError:  # The network uses its sizes as Python ints ('_DimExpr' ... integer).
    return export(_float32(f'b, {h}, {w}, {c}'))


def _float32(shape):
  return jax.ShapeDtypeStruct(jax.export.symbolic_shape(shape), jnp.float32)


def onnx_network(probabilities, image_shape, tolerance=ONNX_TOLERANCE):
  """(ONNX model bytes or None, record): `probabilities` on float32 [B, H, W, C] (B any; H, W
  the training size: jax2onnx 0.17.1 cannot carry symbolic multiples of 32 through the skip
  concatenations), converted by jax2onnx, its intermediate shapes re-inferred by onnx
  (onnx_shapes_inferred), checked by onnx's checker (full_check) and strict shape inference
  (onnx_checks) and with onnxruntime against jax on two random slices; None (and the reason in
  the record) when any fails."""
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
    import onnx  # pylint: disable=g-import-not-at-top
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return None, {'problem': f'{e}: pip install --no-deps -r requirements-onnx.txt'}
  # Its plugin scan warns (with tracebacks) about the equinox / dm_pix plugins we do not use,
  # and onnx_ir about value types it leaves unset: neither says anything about our network.
  for name in ('jax2onnx', 'onnx_ir'):
    logging.getLogger(name).setLevel(logging.ERROR)
  try:
    model = jax2onnx.to_onnx(probabilities, [('B', *image_shape)], model_name='cmedl_student')
    model = onnx_shapes_inferred(model)
    data = model.SerializeToString()
    checks = onnx_checks(onnx.load_from_string(data))
    session = onnxruntime.InferenceSession(data, providers=['CPUExecutionProvider'])
    x = np.random.default_rng(0).uniform(-1, 1, (2, *image_shape)).astype(np.float32)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    difference = float(np.abs(got - np.asarray(jax.jit(probabilities)(x))).max())
  except Exception as e:  # pylint: disable=broad-except  # A converter's failure, reported.
    version = importlib.metadata.version('jax2onnx')
    return None, {'problem': f'jax2onnx {version}: {type(e).__name__}: {e}'[:500]}
  record = {'input_shape': ['B', *image_shape], 'max_abs_difference_vs_jax': difference, **checks}
  failed = [f'{k}: {v}' for k, v in checks.items() if v != 'passed']
  if failed:
    return None, dict(record, problem='; '.join(failed))
  if difference > tolerance:
    return None, dict(record, problem=f'onnxruntime differs from jax by {difference:.2g}')
  return data, dict(record, file=ONNX)


def onnx_shapes_inferred(model):
  """ONNX ModelProto `model` with its intermediate shapes (graph.value_info) inferred by onnx.

  jax2onnx 0.17.1 records them itself, and wrongly where its transpose folding moves a Relu (or
  a residual Add) after a BatchNormalization into NCHW: it copies the new input's shape, but a
  BatchNormalization's output has none, so the old NHWC one stays (onnxruntime warns 'Error
  merging shape info'; onnx's checker rejects the file). Lenient here: what strict inference
  rejects, onnx_checks reports.
  """
  import onnx  # pylint: disable=g-import-not-at-top

  del model.graph.value_info[:]
  return onnx.shape_inference.infer_shapes(model, check_type=True, data_prop=True)


def onnx_checks(model):
  """{'checker_full_check', 'strict_shape_inference'}: 'passed', or the error, of onnx's checker
  (check_model(full_check=True)) and of its strict shape inference on ModelProto `model`."""
  import onnx  # pylint: disable=g-import-not-at-top

  checks = {
    'checker_full_check': lambda: onnx.checker.check_model(model, full_check=True),
    'strict_shape_inference': lambda: onnx.shape_inference.infer_shapes(model, strict_mode=True),
  }
  result = {}
  for name, check in checks.items():
    try:
      check()
      result[name] = 'passed'
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
      result[name] = f'{type(e).__name__}: {e}'[:300]
  return result


def write_portable(out_dir, config, params, batch_stats, test_time, preparation_record):
  """Writes OUT_DIR/network.jax_export, OUT_DIR/network.onnx (when it converts and checks) and
  OUT_DIR/preparation.json (each atomically).

  preparation_record: the run's preparation.json ({'spec': PrepSpec dict, ...}).
  """
  spec = preparation_record['spec']
  image_shape = (*spec['size'], config.data.context_slices)
  probabilities = probabilities_fn(config, params, batch_stats, test_time, image_shape[-1])
  exported = export_network(probabilities, image_shape)
  shape = [str(d) for d in exported.in_avals[0].shape]
  files.atomic_write(os.path.join(out_dir, NETWORK), bytes(exported.serialize()))
  onnx_bytes, onnx_record = onnx_network(probabilities, image_shape)
  if onnx_bytes is not None:
    files.atomic_write(os.path.join(out_dir, ONNX), onnx_bytes)
  elif os.path.exists(os.path.join(out_dir, ONNX)):  # An earlier export's, now stale.
    os.remove(os.path.join(out_dir, ONNX))
  files.write_json(
    os.path.join(out_dir, PREPARATION),
    {
      'format_version': FORMAT_VERSION,
      'network': NETWORK,
      'test_time_network': test_time,
      'input': {
        'shape': shape,
        'dtype': 'float32',
        'range': [-1.0, 1.0],
        'context_slices': config.data.context_slices,
        'channels': 'the slice and its neighbours along the slice axis, clamped at the ends',
      },
      'output': {'shape': shape[:3] + [config.data.num_classes], 'dtype': 'float32'},
      'platforms': list(PLATFORMS),
      'onnx': onnx_record,
      'spec': spec,
      'preparation': {k: v for k, v in preparation_record.items() if k != 'spec'},
      'how': 'data_prep.prepare.prepare_volume(whole_fov=True): canonical (RAS) grid, the '
      'intensity window, in-plane resampling to spec.spacing_mm, padding (-1) to cover the '
      f'whole field of view in a multiple of {prepare.WHOLE_FOV_MULTIPLE} pixels, at least '
      'spec.size; for a fixed input shape (the ONNX file): prepare_volume(whole_fov=False), '
      'crop/pad to spec.size around the body',
    },
    indent=2,
    sort_keys=True,
  )
  return exported


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog='python -m cmedl_jax.portable',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  inference.add_run_arguments(parser)
  parser.add_argument('--out', help='output folder (default: RUN/portable)')
  args = parser.parse_args(argv)
  try:
    run_dir = args.workdir or checkpoint.run_dir_of(args.checkpoint)
    config, record = checkpoint.load_run(run_dir)
    params, stats = inference.load_variables(run_dir, args.checkpoint)
  except (FileNotFoundError, ValueError) as e:
    parser.exit(2, f'portable: error: {e}\n')
  test_time = method.get(config).test_time
  params, stats = method.test_time_variables(test_time, params, stats)
  out = args.out or os.path.join(run_dir, 'portable')
  write_portable(out, config, params, stats, test_time, record)
  written = [f for f in (NETWORK, ONNX, PREPARATION) if os.path.exists(os.path.join(out, f))]
  print(f'portable: {out}: {", ".join(written)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
