"""Time Dice + HD95 + surface Dice on a CT-sized volume (not a test).

Volume 512x512x128 voxels, spacing 0.8x0.8x2.5 mm, a ~50k-voxel ellipsoid tumor as the
reference and, as the prediction, the same ellipsoid shifted by (2, -1, 1) voxels and
dilated once. Prints the median of several runs of

  dice(pred, ref) + hausdorff(..., 95, "voxel") + surface_dice(..., 2 mm, "area")

(each call separately, as a user would call them) and of `evaluate_pair` (all metrics of
the pair sharing one crop). Goal: under 0.1 s.

  python -m benchmarks.metrics [--repeats 7]
"""

import argparse
import statistics
import time

import numpy as np
from scipy import ndimage

from cmedl_jax.evaluation import metrics

SHAPE = (512, 512, 128)
SPACING_MM = (0.8, 0.8, 2.5)
GOAL_S = 0.1


def make_volumes():
  """(pred, ref) bool arrays of SHAPE: shifted+dilated ellipsoid vs ellipsoid."""
  semi_axes = (30.0, 26.0, 15.0)  # voxels: 4/3*pi*30*26*15 ~ 49k voxels
  center = (250.0, 270.0, 60.0)
  grid = np.ogrid[tuple(slice(0, s) for s in SHAPE)]
  ref = sum(((g - c) / a) ** 2 for g, c, a in zip(grid, center, semi_axes)) <= 1.0
  pred = ndimage.binary_dilation(np.roll(ref, (2, -1, 1), axis=(0, 1, 2)))
  return pred, ref


def time_it(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=7)
  args = parser.parse_args(argv)
  pred, ref = make_volumes()
  print(
    f'volume {SHAPE}, spacing {SPACING_MM} mm, tumor {int(ref.sum())} voxels, '
    f'prediction {int(pred.sum())} voxels'
  )

  def three_metrics():
    return (
      metrics.dice(pred, ref),
      metrics.hausdorff(pred, ref, SPACING_MM, 95.0, convention='voxel'),
      metrics.surface_dice(pred, ref, SPACING_MM, 2.0, convention='area'),
    )

  dsc, hd95, sdsc = three_metrics()
  print(f'DSC {dsc:.4f}  HD95 {hd95:.3f} mm  sDSC@2mm {sdsc:.4f}')
  t_three = time_it(three_metrics, args.repeats)
  t_pair = time_it(lambda: metrics.evaluate_pair(pred, ref, SPACING_MM, 2.0), args.repeats)
  t_dice = time_it(lambda: metrics.dice(pred, ref), args.repeats)
  print(
    f'dice + hd95 + surface_dice (3 calls): {t_three * 1e3:.1f} ms (median of '
    f'{args.repeats})  goal < {GOAL_S * 1e3:.0f} ms: '
    f'{"met" if t_three < GOAL_S else "NOT met"}'
  )
  print(f'evaluate_pair (all 5 metrics, shared crop): {t_pair * 1e3:.1f} ms')
  print(f'dice alone: {t_dice * 1e3:.1f} ms')


if __name__ == '__main__':
  main()
