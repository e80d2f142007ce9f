"""The pre-registered phantom study (docs/STUDY_PLAN.md): its runs, their training and testing,
their records and the report built from them (docs/RESULTS.md). `python -m cmedl_jax.study
--help` runs it; its modules are the Python API:

  plan         the runs (plan_runs, ablation_runs, tiny_runs) and the phantom sets
  runner       train commands, training, testing and recording a run (complete_all)
  records      the record files, load_records and the per-record values
  comparisons  the primary decisions, the factorial and the exploratory arms
  tables       the report's tables; figures: its figures
  report       build_report (prose in report_text/*.md)
"""
