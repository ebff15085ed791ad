"""Latent video world models (JEPA, AdaSSL-V, the action oracle): model, training and evaluation.

Folders by layer (docs/architecture.md, "Layers"): model/ (tensors in, losses and rollouts out), run/ (what a run
directory holds: the experiment config, checkpoints), train/ (train.py) and eval/ (evaluate.py), which import the
layers below them and nothing from each other.

Importing the package sets OMP_WAIT_POLICY=PASSIVE unless the environment sets it, before torch loads OpenMP (every
entry point imports `worldmodel` before torch): torch's OpenMP threads then sleep between parallel regions instead
of spinning, so they do not take the cores of the decode workers (measurements: docs/architecture.md, "Thread budget
on few cores").
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
