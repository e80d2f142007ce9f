"""Evaluation reports: per-case and per-tumor tables, summaries, tests, inter-rater, plots.

  python -m cmedl_jax.evaluate --pred DIR --ref DIR [--ref DIR2 ...] [--pred-b DIR]
      --out DIR [--images DIR] [--classes dataset.json | --classes tumor=1,heart=2]
      [--tolerance-mm 2.0] [--name-a NAME] [--name-b NAME] [--connectivity 3]
      [--tumor-classes tumor ...] [--no-plots]

Inputs are NIfTI label volumes (`.nii.gz` / `.nii`) matched by case id: the file name
without the extension (an nnU-Net channel suffix `_0000` is allowed on images only).
Every reference case needs a prediction; prediction and reference must have the same
shape and affine (1e-3 tolerance), otherwise the error names both files. Voxel spacing
comes from the reference header (zooms), in array axis order.

Classes: from a dataset.json "labels" table (MSD {"1": "tumor"} or nnU-Net v2
{"tumor": 1}; background 0 skipped) or `name=label,...`; by default every nonzero label
present in the first reference set, named `label_<k>`.

Metrics (see `cmedl_jax.evaluation.metrics` for definitions and empty-mask conventions):
dice, surface_dice at `--tolerance-mm` (default 2.0 mm; area convention of
surface-distance), hd95, hd and assd in mm (boundary-voxel convention of MONAI/medpy).

Outputs in --out (each written atomically):
  cases.csv        one row per method x case x class (+ false-positive component count)
  tumors.csv       one row per method x case x class x reference connected component
  inter_rater.csv  with several --ref: pairwise raters and the prediction(s) vs each rater
  summary.json, summary.md
                   per method/class/metric: n, mean, sd, median, q1, q3, IQR over finite
                   values, and counts of inf (one mask empty) and NaN values, which are
                   excluded from the statistics; detection counts; Wilcoxon signed-rank
                   p-values (method B vs A, paired by case and by tumor, pairs with a
                   non-finite value excluded and counted); inter-rater summaries.
  plots/box_<metric>.png      box plots per method and class
  plots/overlay_*.png         best / median / worst case of each method by mean DSC
                              (needs --images): the axial slice with the largest
                              reference area, reference (green) and prediction contours.
The summary table is also printed to stdout. The first --ref is the reference of all
metrics; further --ref sets are only used for the inter-rater analysis.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from cmedl_jax.evaluation import cases
from cmedl_jax.evaluation import plots as plotting
from cmedl_jax.evaluation import report
from cmedl_jax.evaluation import statistics
from data_prep import nifti_io


def _folder_name(path: str, fallback: str) -> str:
  return os.path.basename(os.path.normpath(path)) or fallback


def _rater_names(dirs: Sequence[str]) -> list[str]:
  """Folder names of the raters, numbered `_1`, `_2`, ... when two are alike."""
  names = [_folder_name(d, 'dir') for d in dirs]
  if len(set(names)) < len(names):
    names = [f'{n}_{i + 1}' for i, n in enumerate(names)]
  return names


def _prediction_sets(
  pred_dir: str, pred_b_dir: str | None, name_a: str | None, name_b: str | None
) -> dict:
  """{method name: {case: path}} of --pred and, if given, --pred-b (names made distinct)."""
  name_a = name_a or _folder_name(pred_dir, 'A')
  pred_sets = {name_a: nifti_io.list_cases(pred_dir)}
  if pred_b_dir:
    name_b = name_b or _folder_name(pred_b_dir, 'B')
    if name_b == name_a:
      name_b += '_b'
    pred_sets[name_b] = nifti_io.list_cases(pred_b_dir)
  return pred_sets


def _class_map(classes, ref_files, ref_dir: str, tumor_classes) -> dict[str, int]:
  """{name: label} from `classes`, else every label of the references; checks tumor_classes."""
  class_map = cases.parse_classes(classes)
  if class_map is None:
    class_map = cases.classes_present(ref_files, ref_dir)
  if tumor_classes is not None:
    unknown = set(tumor_classes) - set(class_map)
    if unknown:
      raise ValueError(f'--tumor-classes {sorted(unknown)} not in classes {list(class_map)}')
  return class_map


def _evaluate_methods(
  pred_sets, ref_files, class_map, tolerance_mm, connectivity, tumor_classes, verbose
):
  """(case rows, tumor rows) of every prediction set, in order."""
  case_rows, tumor_rows = [], []
  for method, files in pred_sets.items():
    c, t = cases.evaluate_method(
      method, files, ref_files, class_map, tolerance_mm, connectivity, tumor_classes
    )
    case_rows += c
    tumor_rows += t
    if verbose:
      print(f'{method}: {len(c)} case rows, {len(t)} tumor rows', file=sys.stderr)
  return case_rows, tumor_rows


def _settings(pred_dirs, ref_dirs, methods, class_map, tolerance_mm, n_cases, connectivity) -> dict:
  """The "settings" of summary.json: inputs, classes, tolerance and conventions."""
  return {
    'pred': pred_dirs,
    'ref': list(ref_dirs),
    'methods': list(methods),
    'classes': class_map,
    'tolerance_mm': tolerance_mm,
    'n_cases': n_cases,
    'connectivity': connectivity or 'full',
    'conventions': {
      'surface_dice': 'area (surface-distance)',
      'hd95/hd/assd': 'boundary voxels (MONAI/medpy)',
      'empty': 'both empty: dice 1, sDSC 1, distances 0; one empty: dice 0, sDSC 0, distances inf',
    },
  }


def _write_plots(case_rows, ref_files, pred_sets, images_dir, out_dir) -> None:
  """Box plots; overlays when there is an image folder."""
  plotting.plot_boxes(case_rows, out_dir)
  if images_dir:
    plotting.plot_overlays(
      case_rows, ref_files, pred_sets, nifti_io.list_cases(images_dir, image=True), out_dir
    )


def evaluate_dirs(
  pred_dir: str,
  ref_dirs: str | Sequence[str],
  out_dir: str,
  pred_b_dir: str | None = None,
  images_dir: str | None = None,
  classes=None,
  tolerance_mm: float = cases.DEFAULT_TOLERANCE_MM,
  connectivity: int | None = None,
  tumor_classes: Sequence[str] | None = None,
  name_a: str | None = None,
  name_b: str | None = None,
  plots: bool = True,
  verbose: bool = False,
) -> dict:
  """Evaluates prediction folder(s) against reference folder(s); writes the reports.

  See the module docstring for inputs and outputs. Returns the summary dict (as written
  to summary.json, but with float inf/NaN).
  """
  ref_dirs = [ref_dirs] if isinstance(ref_dirs, (str, os.PathLike)) else list(ref_dirs)
  if not ref_dirs:
    raise ValueError('at least one reference folder is needed')
  ref_sets = [nifti_io.list_cases(d) for d in ref_dirs]
  ref_files = ref_sets[0]
  pred_sets = _prediction_sets(pred_dir, pred_b_dir, name_a, name_b)
  class_map = _class_map(classes, ref_files, ref_dirs[0], tumor_classes)
  case_rows, tumor_rows = _evaluate_methods(
    pred_sets, ref_files, class_map, tolerance_mm, connectivity, tumor_classes, verbose
  )
  rater_rows = []
  if len(ref_sets) > 1:
    rater_rows = cases.rater_agreement(
      dict(zip(_rater_names(ref_dirs), ref_sets)), pred_sets, class_map, tolerance_mm
    )
  settings = _settings(
    [pred_dir] + ([pred_b_dir] if pred_b_dir else []),
    ref_dirs,
    pred_sets,
    class_map,
    tolerance_mm,
    len(ref_files),
    connectivity,
  )
  pair = list(pred_sets) if pred_b_dir else None
  summary = {
    'settings': settings,
    **statistics.summary_sections(case_rows, tumor_rows, rater_rows, pair),
  }
  markdown = report.write_reports(out_dir, summary, case_rows, tumor_rows, rater_rows)
  if plots:
    _write_plots(case_rows, ref_files, pred_sets, images_dir, out_dir)
  print(markdown)
  return summary


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog='python -m cmedl_jax.evaluate',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument('--pred', required=True, help='folder of predicted label NIfTIs')
  parser.add_argument(
    '--ref',
    required=True,
    action='append',
    help='folder of reference labels; repeat for several raters '
    '(the first is the reference of all metrics)',
  )
  parser.add_argument('--pred-b', help='second prediction folder (paired tests)')
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--images', help='folder of images for overlay PNGs')
  parser.add_argument('--classes', help="dataset.json with 'labels', or name=label,...")
  parser.add_argument(
    '--tolerance-mm',
    type=float,
    default=cases.DEFAULT_TOLERANCE_MM,
    help='surface Dice tolerance in mm (default %(default)s)',
  )
  parser.add_argument(
    '--connectivity',
    type=int,
    default=None,
    help='tumor components: 1 = faces ... 3 = full (default: full)',
  )
  parser.add_argument(
    '--tumor-classes', nargs='+', default=None, help='classes evaluated per tumor (default: all)'
  )
  parser.add_argument('--name-a', help='name of --pred (default: folder name)')
  parser.add_argument('--name-b', help='name of --pred-b (default: folder name)')
  parser.add_argument('--no-plots', action='store_true')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    evaluate_dirs(
      args.pred,
      args.ref,
      args.out,
      pred_b_dir=args.pred_b,
      images_dir=args.images,
      classes=args.classes,
      tolerance_mm=args.tolerance_mm,
      connectivity=args.connectivity,
      tumor_classes=args.tumor_classes,
      name_a=args.name_a,
      name_b=args.name_b,
      plots=not args.no_plots,
    )
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
