"""Rollout evaluators of a trained world model (entry point: evaluate.py).

Modules: rollout_metrics (per-horizon errors), probes / probe_suite (ridge, logistic, AUC read-outs),
collect (one pass over the eval batches through model.rollout), runner (evaluate_run: files into RUN_DIR/eval),
plots, report (report.md), compare (side-by-side table of evaluated runs). Schema: docs/metrics_schema.md.
"""


class EvaluationError(RuntimeError):
    """An evaluation cannot run as asked (no checkpoint, horizon too long, no clips, run not evaluated yet)."""
