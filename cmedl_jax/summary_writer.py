"""TensorBoard event files without TensorFlow, behind clu's metric-writer methods.

clu's SummaryWriter writes through TensorFlow (`tf.summary`), and importing anything from
`clu.metric_writers` imports TensorFlow (clu 0.0.12). This writer writes the summaries
`tf.summary.scalar` and `tf.summary.image` write (a float32 scalar tensor; a string tensor
[width, height, PNG...]; the plugin's name as metadata) with tensorboard's protos and
RecordWriter and PIL's PNG encoder, so TensorBoard, `cmedl_jax.curves` and tensorboard's
EventAccumulator read them as they read TensorFlow's. The writes run in one background thread,
in order, as clu's AsyncWriter runs them (clu's Pool: an error there is raised by the next call).
"""

import io
import itertools
import os
import socket
import time
from typing import Mapping, Optional

from clu import asynclib
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer import record_writer
from tensorboard.util import tensor_util

_WRITERS = itertools.count()  # The last part of the file names of this process's writers.


class SummaryWriter:
  """Scalars and images to a new `logdir/events.out.tfevents.*`; writes nothing with logdir
  None (the processes other than 0)."""

  def __init__(self, logdir: Optional[str]):
    self._pool = asynclib.Pool(thread_name_prefix='SummaryWriter', max_workers=1)
    self._records = None
    if logdir is not None:
      os.makedirs(logdir, exist_ok=True)
      # tensorboard's EventFileWriter's names: the files of a resumed run sort by time.
      name = (
        f'events.out.tfevents.{time.time():010.0f}.{socket.gethostname()}.{os.getpid()}.'
        f'{next(_WRITERS)}'
      )
      self._records = record_writer.RecordWriter(open(os.path.join(logdir, name), 'xb'))
      self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def write_scalars(self, step: int, scalars: Mapping[str, float]):
    """scalars: {tag: number}, stored as float32."""
    self._pool(self._write_values)(step, dict(scalars), _scalar_value)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]):
    """images: {tag: [N, H, W, C] or [H, W, C]}, C 1 (grey), 3 or 4; floats in [0, 1] (as
    tf.image.convert_image_dtype: x 255.5, truncated) or uint8."""
    self._pool(self._write_values)(step, dict(images), _image_value)

  def flush(self):
    """Waits for the writes so far and flushes the file; raises the error of a failed write."""
    self._pool.join()
    if self._records is not None:
      self._records.flush()

  def close(self):
    """Waits for the writes and closes the file; raises the error of a failed write."""
    try:
      self._pool.close()
    finally:
      if self._records is not None:
        self._records.close()
        self._records = None

  def _write_values(self, step, values, summary_value):
    event = event_pb2.Event(wall_time=time.time(), step=int(step))
    event.summary.value.extend(summary_value(tag, v) for tag, v in values.items())
    self._write(event)

  def _write(self, event):
    if self._records is not None:
      self._records.write(event.SerializeToString())


def _metadata(plugin_name):
  return summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin_name)
  )


def _scalar_value(tag, value):
  tensor = tensor_util.make_tensor_proto(np.float32(value))
  return summary_pb2.Summary.Value(
    tag=tag, tensor=tensor, metadata=_metadata(scalar_metadata.PLUGIN_NAME)
  )


def _image_value(tag, images):
  images = np.asarray(images)
  images = images[None] if images.ndim == 3 else images
  if images.dtype != np.uint8:
    images = (np.clip(images, 0.0, 1.0) * 255.5).astype(np.uint8)
  pngs = []
  for image in images:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, 'PNG')
    pngs.append(buffer.getvalue())
  height, width = images.shape[1:3]
  tensor = tensor_util.make_tensor_proto([str(width).encode(), str(height).encode(), *pngs])
  return summary_pb2.Summary.Value(
    tag=tag, tensor=tensor, metadata=_metadata(image_metadata.PLUGIN_NAME)
  )
