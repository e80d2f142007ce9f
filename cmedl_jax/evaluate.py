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
import csv
import io
import itertools
import json
import math
import os
import re
import sys
import tempfile
import warnings
from typing import Mapping, Sequence

import numpy as np

from cmedl_jax.evaluation import metrics

METRICS = metrics.METRIC_NAMES
NIFTI_SUFFIXES = (".nii.gz", ".nii")
AFFINE_ATOL = 1e-3
DEFAULT_TOLERANCE_MM = 2.0

# ----------------------------------------------------------------------------------------
# Files.


def atomic_write(path: str, data) -> None:
  """Writes str or bytes to `path` via a temporary file in the same folder."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  mode = "w" if isinstance(data, str) else "wb"
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if mode == "w" else {})) as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def case_id(filename: str, image: bool = False) -> str | None:
  """Case id of a NIfTI file name (None if not NIfTI); images may end in `_0000`."""
  name = os.path.basename(filename)
  for suffix in NIFTI_SUFFIXES:
    if name.endswith(suffix):
      stem = name[:-len(suffix)]
      if image:
        stem = re.sub(r"_\d{4}$", "", stem)
      return stem
  return None


def list_cases(directory: str, image: bool = False) -> dict[str, str]:
  """{case id: path} of the NIfTI files in `directory`.

  For images with several channels (`_0000`, `_0001`, ...) the lowest channel is used.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"not a directory: {directory}")
  cases: dict[str, str] = {}
  for name in sorted(os.listdir(directory)):
    cid = case_id(name, image)
    if cid is None:
      continue
    path = os.path.join(directory, name)
    if cid in cases:
      if image:
        continue  # sorted: the first channel wins
      raise ValueError(f"two files for case {cid!r} in {directory}: "
                       f"{os.path.basename(cases[cid])} and {name}")
    cases[cid] = path
  if not cases:
    raise ValueError(f"no NIfTI files (.nii.gz, .nii) in {directory}")
  return cases


def load_nifti(path: str, labels: bool = True):
  """(array, spacing_mm per array axis, affine 4x4) of a NIfTI file.

  labels=True: the array must hold integers (stored as int or float) and is returned
  as an integer array. A trailing singleton 4th axis is dropped.
  """
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  try:
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
  except Exception as e:  # nibabel raises several types for damaged files
    raise ValueError(f"{path}: cannot read NIfTI ({e})") from e
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim not in (2, 3):
    raise ValueError(f"{path}: expected a 2D or 3D volume, got shape {data.shape}")
  # NIfTI stores zooms as float32 (0.8 -> 0.800000011920929); take the shortest decimal
  # that float32 value stands for, so that a distance equal to a tolerance given in mm
  # (e.g. 0.8 mm = one voxel) is not pushed above it.
  spacing = tuple(float(np.format_float_positional(np.float32(z), unique=True))
                  for z in img.header.get_zooms()[:data.ndim])
  if labels:
    if not np.issubdtype(data.dtype, np.integer):
      rounded = np.rint(data)
      if not np.array_equal(rounded, data):
        raise ValueError(f"{path}: label volume holds non-integer values")
      data = rounded
    lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
    if lo < 0:
      raise ValueError(f"{path}: negative label {lo}")
    data = data.astype(np.uint8 if hi < 256 else np.int32)
  return data, spacing, np.asarray(img.affine, np.float64)


def check_same_grid(path_a: str, shape_a, affine_a, path_b: str, shape_b, affine_b) -> None:
  """Raises ValueError naming both files if their shapes or affines differ."""
  if tuple(shape_a) != tuple(shape_b):
    raise ValueError(f"shape mismatch: {path_a} has {tuple(shape_a)}, "
                     f"{path_b} has {tuple(shape_b)}")
  if not np.allclose(affine_a, affine_b, atol=AFFINE_ATOL, rtol=0):
    raise ValueError(f"affine mismatch (> {AFFINE_ATOL}): {path_a} vs {path_b}:\n"
                     f"{np.round(affine_a, 4)}\nvs\n{np.round(affine_b, 4)}")


def parse_classes(spec) -> dict[str, int] | None:
  """Classes {name: label} from None, a dict, a dataset.json path or 'a=1,b=2'."""
  if spec is None or isinstance(spec, Mapping):
    return None if spec is None else {str(k): int(v) for k, v in spec.items()}
  spec = str(spec)
  if os.path.isfile(spec):
    with open(spec, encoding="utf-8") as f:
      table = json.load(f).get("labels")
    if not isinstance(table, Mapping) or not table:
      raise ValueError(f"{spec}: no 'labels' table")
    classes = {}
    for key, value in table.items():
      if str(key).isdigit():  # MSD: {"1": "tumor"}
        name, label = str(value), int(key)
      elif isinstance(value, (int, str)) and str(value).isdigit():  # nnU-Net v2
        name, label = str(key), int(value)
      else:
        raise ValueError(f"{spec}: label {key!r}: {value!r} is not a single integer label "
                         f"(region-based labels are not supported)")
      if label != 0:
        classes[name] = label
    return classes
  classes = {}
  for item in spec.split(","):
    name, sep, label = item.partition("=")
    if not sep or not label.strip().isdigit():
      raise ValueError(f"--classes: expected a dataset.json path or name=label,..., "
                       f"got {spec!r}")
    classes[name.strip()] = int(label)
  return classes


# ----------------------------------------------------------------------------------------
# Evaluation of a method.


def evaluate_method(method: str, pred_files: Mapping[str, str], ref_files: Mapping[str, str],
                    classes: Mapping[str, int], tolerance_mm: float,
                    connectivity: int | None = None,
                    tumor_classes: Sequence[str] | None = None):
  """(case rows, tumor rows) of one prediction set against the reference set."""
  missing = sorted(set(ref_files) - set(pred_files))
  if missing:
    raise ValueError(f"{method}: no prediction for {len(missing)} reference case(s): "
                     f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
  extra = sorted(set(pred_files) - set(ref_files))
  if extra:
    print(f"warning: {method}: {len(extra)} prediction(s) without reference ignored: "
          f"{', '.join(extra[:10])}", file=sys.stderr)
  tumor_classes = list(classes) if tumor_classes is None else list(tumor_classes)
  case_rows, tumor_rows = [], []
  for cid in sorted(ref_files):
    ref, spacing, ref_affine = load_nifti(ref_files[cid])
    pred, _, pred_affine = load_nifti(pred_files[cid])
    check_same_grid(pred_files[cid], pred.shape, pred_affine, ref_files[cid], ref.shape,
                    ref_affine)
    for path, volume in ((pred_files[cid], pred), (ref_files[cid], ref)):
      unknown = sorted(set(np.unique(volume).tolist()) - {0} - set(classes.values()))
      if unknown:
        print(f"warning: {path}: labels {unknown} are not among the evaluated classes "
              f"{dict(classes)}; their {int(np.isin(volume, unknown).sum())} voxels count as "
              "background", file=sys.stderr)
    per_class = metrics.evaluate_case(pred, ref, spacing, classes, tolerance_mm)
    for name, label in classes.items():
      row = {"method": method, "case": cid, "class": name, **per_class[name]}
      row["n_fp_components"] = metrics.count_false_positive_components(
          pred == label, ref == label, connectivity)
      case_rows.append(row)
      if name in tumor_classes:
        for t in metrics.evaluate_tumors(pred == label, ref == label, spacing, tolerance_mm,
                                         connectivity):
          centroid = t.pop("centroid_vox")
          t.update({f"centroid_vox_{a}": round(c, 2) for a, c in enumerate(centroid)})
          tumor_rows.append({"method": method, "case": cid, "class": name, **t})
  return case_rows, tumor_rows


def rater_agreement(rater_files: Mapping[str, Mapping[str, str]],
                    pred_sets: Mapping[str, Mapping[str, str]], classes: Mapping[str, int],
                    tolerance_mm: float) -> list[dict]:
  """Rows of pairwise metrics between raters and of each prediction set vs each rater.

  rater_files: {rater name: {case: path}}; only cases every rater labelled are used.
  Row "a" is the compared segmentation, "b" the one used as reference.
  """
  cases = sorted(set.intersection(*(set(f) for f in rater_files.values())))
  rows = []
  for cid in cases:
    loaded = {r: load_nifti(files[cid]) for r, files in rater_files.items()}
    first = next(iter(rater_files))
    for r in rater_files:
      check_same_grid(rater_files[r][cid], loaded[r][0].shape, loaded[r][2],
                      rater_files[first][cid], loaded[first][0].shape, loaded[first][2])
    pairs = list(itertools.combinations(rater_files, 2))
    for method, files in pred_sets.items():
      if cid in files:
        loaded[method] = load_nifti(files[cid])
        check_same_grid(files[cid], loaded[method][0].shape, loaded[method][2],
                        rater_files[first][cid], loaded[first][0].shape, loaded[first][2])
        pairs += [(method, r) for r in rater_files]
    for a, b in pairs:
      per_class = metrics.evaluate_case(loaded[a][0], loaded[b][0], loaded[b][1], classes,
                                        tolerance_mm)
      for name in classes:
        rows.append({"a": a, "b": b, "pair": f"{a} vs {b}", "case": cid, "class": name,
                     **{m: per_class[name][m] for m in METRICS}})
  return rows


# ----------------------------------------------------------------------------------------
# Statistics.


def describe(values) -> dict:
  """n, counts of inf/NaN and mean, sd (ddof 1), median, q1, q3, IQR of finite values."""
  v = np.asarray(list(values), np.float64)
  finite = v[np.isfinite(v)]
  out = {"n": int(v.size), "n_finite": int(finite.size), "n_inf": int(np.isinf(v).sum()),
         "n_nan": int(np.isnan(v).sum())}
  if finite.size:
    q1, median, q3 = np.percentile(finite, [25, 50, 75])
    out.update(mean=float(finite.mean()),
               sd=float(finite.std(ddof=1)) if finite.size > 1 else float("nan"),
               median=float(median), q1=float(q1), q3=float(q3), iqr=float(q3 - q1))
  else:
    out.update({k: float("nan") for k in ("mean", "sd", "median", "q1", "q3", "iqr")})
  return out


def summarize(rows: Sequence[dict], keys: Sequence[str],
              metric_names: Sequence[str] = METRICS) -> list[dict]:
  """describe() of each metric per group of `keys` (in first-seen order)."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(tuple(row[k] for k in keys), []).append(row)
  return [{**dict(zip(keys, group)), "metric": m, **describe(r[m] for r in members)}
          for group, members in groups.items() for m in metric_names]


def detection_counts(case_rows, tumor_rows) -> list[dict]:
  """Per method and class: tumors, detected tumors, false-positive predicted components."""
  out = {}
  for row in case_rows:
    entry = out.setdefault((row["method"], row["class"]), {
        "method": row["method"], "class": row["class"], "n_tumors": 0, "n_detected": 0,
        "n_fp_components": 0})
    entry["n_fp_components"] += row["n_fp_components"]
  for row in tumor_rows:
    entry = out[(row["method"], row["class"])]
    entry["n_tumors"] += 1
    entry["n_detected"] += int(row["detected"])
  for entry in out.values():
    entry["detection_rate"] = (entry["n_detected"] / entry["n_tumors"]
                               if entry["n_tumors"] else float("nan"))
  return list(out.values())


def wilcoxon_tests(rows_a, rows_b, pair_keys: Sequence[str], level: str,
                   metric_names: Sequence[str] = METRICS) -> list[dict]:
  """Paired two-sided Wilcoxon signed-rank tests (scipy.stats.wilcoxon) of B vs A.

  Rows are paired by `pair_keys` (e.g. case and class); grouped by class. Pairs where
  either value is inf or NaN are excluded and counted. p is NaN with fewer than 2 pairs
  or when all differences are zero.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top
  index_b = {tuple(r[k] for k in pair_keys): r for r in rows_b}
  out = []
  classes = list(dict.fromkeys(r["class"] for r in rows_a))
  for cls in classes:
    pairs = [(r, index_b.get(tuple(r[k] for k in pair_keys))) for r in rows_a
             if r["class"] == cls]
    pairs = [(a, b) for a, b in pairs if b is not None]
    for m in metric_names:
      a = np.array([p[0][m] for p in pairs], np.float64)
      b = np.array([p[1][m] for p in pairs], np.float64)
      ok = np.isfinite(a) & np.isfinite(b)
      a, b = a[ok], b[ok]
      diff = b - a
      entry = {"level": level, "class": cls, "metric": m, "n_pairs": int(a.size),
               "n_excluded_nonfinite": int((~ok).sum()),
               "median_a": float(np.median(a)) if a.size else float("nan"),
               "median_b": float(np.median(b)) if b.size else float("nan"),
               "median_diff_b_minus_a": float(np.median(diff)) if a.size else float("nan"),
               "statistic": float("nan"), "p_value": float("nan")}
      if a.size >= 2 and np.any(diff != 0):
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          result = stats.wilcoxon(b, a)
        entry["statistic"], entry["p_value"] = float(result.statistic), float(result.pvalue)
      out.append(entry)
  return out


# ----------------------------------------------------------------------------------------
# Writing tables.


def _csv_text(rows: Sequence[dict]) -> str:
  fields = list(dict.fromkeys(k for r in rows for k in r))
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in row.items()})
  return buf.getvalue()


def _json_safe(obj):
  """JSON has no inf/NaN: they become the strings "inf", "-inf", "nan"."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
  if isinstance(obj, dict):
    return {k: _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  return obj


def _fmt(x, digits=3) -> str:
  return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"


def _summary_table(stats_rows, group_keys) -> str:
  head = group_keys + ["metric", "n", "mean ± sd", "median [q1, q3]", "inf", "nan"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for s in stats_rows:
    lines.append("| " + " | ".join(
        [str(s[k]) for k in group_keys] +
        [s["metric"], str(s["n"]), f"{_fmt(s['mean'])} ± {_fmt(s['sd'])}",
         f"{_fmt(s['median'])} [{_fmt(s['q1'])}, {_fmt(s['q3'])}]", str(s["n_inf"]),
         str(s["n_nan"])]) + " |")
  return "\n".join(lines)


def summary_markdown(summary: dict) -> str:
  s = summary["settings"]
  parts = [f"# Segmentation evaluation\n\nreference: `{s['ref'][0]}`; methods: "
           f"{', '.join(s['methods'])}; tolerance {s['tolerance_mm']} mm; "
           f"{s['n_cases']} cases. Statistics over finite values; `inf` counts cases with "
           f"one mask empty (DSC 0, distances inf).",
           "## Per case\n\n" + _summary_table(summary["per_case"], ["method", "class"])]
  if summary["per_tumor"]:
    parts.append("## Per tumor (reference connected components)\n\n" +
                 _summary_table(summary["per_tumor"], ["method", "class"]))
  det = summary["detection"]
  if det:
    lines = ["| method | class | tumors | detected | rate | FP components |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {d['method']} | {d['class']} | {d['n_tumors']} | {d['n_detected']} | "
              f"{_fmt(d['detection_rate'])} | {d['n_fp_components']} |" for d in det]
    parts.append("## Detection\n\n" + "\n".join(lines))
  if summary["wilcoxon"]:
    lines = [f"B = {s['methods'][1]} vs A = {s['methods'][0]}, two-sided paired Wilcoxon "
             f"signed-rank test (scipy.stats.wilcoxon).\n",
             "| level | class | metric | pairs | median A | median B | median B−A | p |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {w['level']} | {w['class']} | {w['metric']} | {w['n_pairs']} | "
              f"{_fmt(w['median_a'])} | {_fmt(w['median_b'])} | "
              f"{_fmt(w['median_diff_b_minus_a'])} | {_fmt(w['p_value'], 4)} |"
              for w in summary["wilcoxon"]]
    parts.append("## Paired tests\n\n" + "\n".join(lines))
  if summary["inter_rater"]:
    parts.append("## Inter-rater agreement\n\n" +
                 _summary_table(summary["inter_rater"], ["pair", "class"]))
  return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------
# Plots.


def save_figure(fig, path: str) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
  atomic_write(path, buf.getvalue())


def plot_boxes(case_rows: Sequence[dict], out_dir: str) -> list[str]:
  """plots/box_<metric>.png: one box per method and class (finite values only)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  groups = list(dict.fromkeys((r["method"], r["class"]) for r in case_rows))
  paths = []
  for m in METRICS:
    data, labels = [], []
    for method, cls in groups:
      v = np.array([r[m] for r in case_rows if (r["method"], r["class"]) == (method, cls)],
                   np.float64)
      finite = v[np.isfinite(v)]
      data.append(finite)
      n_bad = v.size - finite.size
      labels.append(f"{method}\n{cls}" + (f"\n({n_bad} non-finite)" if n_bad else ""))
    fig, ax = plt.subplots(figsize=(max(3.0, 1.6 * len(groups)), 3.6))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    ax.set_ylabel(m + ("" if m in ("dice", "surface_dice") else " (mm)"))
    ax.set_title(m)
    path = os.path.join(out_dir, "plots", f"box_{m}.png")
    save_figure(fig, path)
    plt.close(fig)
    paths.append(path)
  return paths


def _canonical(path, labels):
  """(array (X, Y, Z) in closest canonical RAS orientation, zooms) for display."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  img = nib.load(path)
  if len(img.shape) >= 3:
    img = nib.as_closest_canonical(img)
  data = np.asanyarray(img.dataobj)
  zooms = tuple(float(z) for z in img.header.get_zooms()[:2])
  if data.ndim == 4:
    data = data[..., 0]
  if data.ndim == 2:
    data = data[:, :, None]
  return (np.rint(data).astype(np.int32) if labels else data.astype(np.float32)), zooms


def plot_overlays(case_rows, ref_files, pred_sets, image_files, out_dir) -> list[str]:
  """Best, median and worst case (mean DSC over classes) of each method.

  Each PNG shows the axial slice (canonical RAS, last axis) with the largest reference
  area: the image in grey, the reference contour in green and each prediction's contour
  (first method red, second blue, dashed).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  colors = ["red", "dodgerblue", "orange", "magenta"]
  paths = []
  for method in pred_sets:
    per_case = {}
    for r in case_rows:
      if r["method"] == method:
        per_case.setdefault(r["case"], []).append(r["dice"])
    ranked = sorted((float(np.mean(v)), c) for c, v in per_case.items())
    if not ranked:
      continue
    picks = {"worst": ranked[0], "median": ranked[len(ranked) // 2], "best": ranked[-1]}
    for rank, (score, cid) in picks.items():
      if cid not in image_files:
        print(f"warning: no image for case {cid}; overlay skipped", file=sys.stderr)
        continue
      image, zooms = _canonical(image_files[cid], labels=False)
      ref, _ = _canonical(ref_files[cid], labels=True)
      preds = {m: _canonical(files[cid], labels=True)[0] for m, files in pred_sets.items()
               if cid in files}
      if image.shape != ref.shape:
        raise ValueError(f"image {image_files[cid]} shape {image.shape} != reference "
                         f"{ref_files[cid]} shape {ref.shape}")
      area = (ref > 0).sum(axis=(0, 1))
      if not area.any():
        area = (preds[method] > 0).sum(axis=(0, 1))
      k = int(np.argmax(area)) if area.any() else ref.shape[2] // 2
      sl = image[:, :, k]
      lo, hi = np.percentile(sl, [1, 99])
      fig, ax = plt.subplots(figsize=(5, 5))
      ax.imshow(sl.T, cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1,
                aspect=zooms[1] / zooms[0])
      for label in np.unique(ref[:, :, k])[1:]:
        ax.contour((ref[:, :, k] == label).T, levels=[0.5], colors="lime", linewidths=1.2)
      for i, (m, pred) in enumerate(preds.items()):
        for label in np.unique(pred[:, :, k])[1:]:
          ax.contour((pred[:, :, k] == label).T, levels=[0.5], colors=colors[i % 4],
                     linewidths=1.0, linestyles="solid" if i == 0 else "dashed")
      ax.set_title(f"{method} {rank}: {cid} (mean DSC {score:.3f}), slice {k}\n"
                   f"green: reference; " + ", ".join(
                       f"{colors[i % 4]}: {m}" for i, m in enumerate(preds)), fontsize=8)
      ax.axis("off")
      safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"overlay_{method}_{rank}_{cid}.png")
      path = os.path.join(out_dir, "plots", safe)
      save_figure(fig, path)
      plt.close(fig)
      paths.append(path)
  return paths


# ----------------------------------------------------------------------------------------
# Entry points.


def _unique_names(dirs: Sequence[str]) -> list[str]:
  names = [os.path.basename(os.path.normpath(d)) or "dir" for d in dirs]
  if len(set(names)) < len(names):
    names = [f"{n}_{i + 1}" for i, n in enumerate(names)]
  return names


def evaluate_dirs(pred_dir: str, ref_dirs: str | Sequence[str], out_dir: str,
                  pred_b_dir: str | None = None, images_dir: str | None = None,
                  classes=None, tolerance_mm: float = DEFAULT_TOLERANCE_MM,
                  connectivity: int | None = None, tumor_classes: Sequence[str] | None = None,
                  name_a: str | None = None, name_b: str | None = None,
                  plots: bool = True, verbose: bool = False) -> dict:
  """Evaluates prediction folder(s) against reference folder(s); writes the reports.

  See the module docstring for inputs and outputs. Returns the summary dict (as written
  to summary.json, but with float inf/NaN).
  """
  ref_dirs = [ref_dirs] if isinstance(ref_dirs, (str, os.PathLike)) else list(ref_dirs)
  if not ref_dirs:
    raise ValueError("at least one reference folder is needed")
  ref_sets = [list_cases(d) for d in ref_dirs]
  ref_files = ref_sets[0]
  name_a = name_a or os.path.basename(os.path.normpath(pred_dir)) or "A"
  pred_sets = {name_a: list_cases(pred_dir)}
  if pred_b_dir:
    name_b = name_b or os.path.basename(os.path.normpath(pred_b_dir)) or "B"
    if name_b == name_a:
      name_b += "_b"
    pred_sets[name_b] = list_cases(pred_b_dir)
  class_map = parse_classes(classes)
  if class_map is None:
    present = set()
    for path in ref_files.values():
      present |= set(np.unique(load_nifti(path)[0]).tolist())
    class_map = {f"label_{k}": int(k) for k in sorted(present - {0})}
    if not class_map:
      raise ValueError(f"no foreground label in any reference of {ref_dirs[0]}; "
                       f"pass --classes")
  if tumor_classes is not None:
    unknown = set(tumor_classes) - set(class_map)
    if unknown:
      raise ValueError(f"--tumor-classes {sorted(unknown)} not in classes {list(class_map)}")

  case_rows, tumor_rows = [], []
  for method, files in pred_sets.items():
    c, t = evaluate_method(method, files, ref_files, class_map, tolerance_mm, connectivity,
                           tumor_classes)
    case_rows += c
    tumor_rows += t
    if verbose:
      print(f"{method}: {len(c)} case rows, {len(t)} tumor rows", file=sys.stderr)

  rater_rows = []
  if len(ref_sets) > 1:
    raters = dict(zip(_unique_names(ref_dirs), ref_sets))
    rater_rows = rater_agreement(raters, pred_sets, class_map, tolerance_mm)

  wilcoxon = []
  if pred_b_dir:
    rows_a = [r for r in case_rows if r["method"] == name_a]
    rows_b = [r for r in case_rows if r["method"] == name_b]
    wilcoxon = wilcoxon_tests(rows_a, rows_b, ("case", "class"), "case")
    ta = [r for r in tumor_rows if r["method"] == name_a]
    tb = [r for r in tumor_rows if r["method"] == name_b]
    if ta:
      wilcoxon += wilcoxon_tests(ta, tb, ("case", "class", "tumor"), "tumor")

  summary = {
      "settings": {"pred": [pred_dir] + ([pred_b_dir] if pred_b_dir else []),
                   "ref": list(ref_dirs), "methods": list(pred_sets), "classes": class_map,
                   "tolerance_mm": tolerance_mm, "n_cases": len(ref_files),
                   "connectivity": connectivity or "full",
                   "conventions": {"surface_dice": "area (surface-distance)",
                                   "hd95/hd/assd": "boundary voxels (MONAI/medpy)",
                                   "empty": "both empty: dice 1, sDSC 1, distances 0; "
                                            "one empty: dice 0, sDSC 0, distances inf"}},
      "per_case": summarize(case_rows, ["method", "class"]),
      "per_tumor": summarize(tumor_rows, ["method", "class"]) if tumor_rows else [],
      "detection": detection_counts(case_rows, tumor_rows),
      "wilcoxon": wilcoxon,
      "inter_rater": summarize(rater_rows, ["pair", "class"]) if rater_rows else [],
  }

  os.makedirs(out_dir, exist_ok=True)
  atomic_write(os.path.join(out_dir, "cases.csv"), _csv_text(case_rows))
  atomic_write(os.path.join(out_dir, "tumors.csv"), _csv_text(tumor_rows) if tumor_rows
                else "method,case,class,tumor\n")
  if rater_rows:
    atomic_write(os.path.join(out_dir, "inter_rater.csv"), _csv_text(rater_rows))
  atomic_write(os.path.join(out_dir, "summary.json"),
                json.dumps(_json_safe(summary), indent=1) + "\n")
  markdown = summary_markdown(summary)
  atomic_write(os.path.join(out_dir, "summary.md"), markdown)
  if plots:
    plot_boxes(case_rows, out_dir)
    if images_dir:
      plot_overlays(case_rows, ref_files, pred_sets, list_cases(images_dir, image=True),
                    out_dir)
  print(markdown)
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m cmedl_jax.evaluate", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--pred", required=True, help="folder of predicted label NIfTIs")
  parser.add_argument("--ref", required=True, action="append",
                      help="folder of reference labels; repeat for several raters "
                           "(the first is the reference of all metrics)")
  parser.add_argument("--pred-b", help="second prediction folder (paired tests)")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--images", help="folder of images for overlay PNGs")
  parser.add_argument("--classes", help="dataset.json with 'labels', or name=label,...")
  parser.add_argument("--tolerance-mm", type=float, default=DEFAULT_TOLERANCE_MM,
                      help="surface Dice tolerance in mm (default %(default)s)")
  parser.add_argument("--connectivity", type=int, default=None,
                      help="tumor components: 1 = faces ... 3 = full (default: full)")
  parser.add_argument("--tumor-classes", nargs="+", default=None,
                      help="classes evaluated per tumor (default: all)")
  parser.add_argument("--name-a", help="name of --pred (default: folder name)")
  parser.add_argument("--name-b", help="name of --pred-b (default: folder name)")
  parser.add_argument("--no-plots", action="store_true")
  args = parser.parse_args(argv)
  try:
    evaluate_dirs(args.pred, args.ref, args.out, pred_b_dir=args.pred_b,
                  images_dir=args.images, classes=args.classes,
                  tolerance_mm=args.tolerance_mm, connectivity=args.connectivity,
                  tumor_classes=args.tumor_classes, name_a=args.name_a,
                  name_b=args.name_b, plots=not args.no_plots)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
