"""Rollout evaluators of a trained world model (entry point: evaluate.py).

Modules: rollout_metrics (per-horizon errors), probes / probe_suite (ridge, logistic, AUC read-outs), leakage (the
shuffled-r and transfer checks), pixel_decoder (the decoder trained after the fact), collect (one pass over the eval
batches through model.rollout), runner (evaluate_run: files into RUN_DIR/eval), sections (the metrics.json sections
computed after the pass), plots and figures (the figures), report, report_readouts and report_tables (report.md),
compare (side-by-side table of evaluated runs). Schema: docs/metrics_schema.md.
"""


class EvaluationError(RuntimeError):
    """An evaluation cannot run as asked (no checkpoint, horizon too long, no clips, run not evaluated yet)."""
