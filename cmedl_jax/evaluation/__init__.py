"""Segmentation evaluation, one job a module.

metrics     DSC, surface Dice, HD95, HD, ASSD of label volumes, per case and per tumor.
cases       matching prediction and reference files by case; per-method and inter-rater rows.
statistics  summaries over finite values, detection counts, paired Wilcoxon tests.
report      cases.csv / tumors.csv / inter_rater.csv, summary.json and summary.md.
plots       box plots and overlay PNGs.

The command line is `python -m cmedl_jax.evaluate`.
"""
