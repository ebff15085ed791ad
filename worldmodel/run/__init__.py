"""What a run directory holds, written by training and read by evaluation (docs/architecture.md, "Run directory").

Modules: config (ExperimentConfig: the YAML config, its overrides and validation; RUN_DIR/config.yaml),
checkpoint (atomic full-state checkpoints under RUN_DIR/checkpoints/ and the completion marker RUN_DIR/finished.json),
manifest (a checkpoint's manifest.json and its verification). Training and evaluation share this package and
import nothing from each other.
"""
