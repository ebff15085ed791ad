"""Research scripts: the experiments behind docs/results.md (ablations, sweeps, diagnostics, minimal models).

Not part of the installed package (pyproject.toml packages only worldmodel, data_pipeline, worlds and benchmarks):
run them from the repository root, `python -m experiments.NAME`. The published tables come from
`python -m benchmarks.results`, which imports nothing from here.
"""
