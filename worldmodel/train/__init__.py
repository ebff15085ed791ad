"""Training (entry point: train.py): the accelerate loop and what it sets up, launches, schedules and logs.

Modules: loop (train: the run from start to end), state (what a run holds between steps: built from the config and a
checkpoint, saved to one), step (one optimiser step), window (the statistics between two log lines, the skip alarm),
setup (mixed precision, the optimizer and the speed options, shared with benchmarks/step_speed.py), launch (world
size, resume decision, stop signals, exit statuses), schedules (LR, EMA momentum, beta), metrics_log
(metrics.jsonl, TensorBoard, progress bar).
"""
