"""Latent video world models (JEPA, AdaSSL-V, the action oracle): model, training and evaluation.

Importing the package sets OMP_WAIT_POLICY=PASSIVE unless the environment sets it, before torch loads OpenMP (every
entry point imports `worldmodel` before torch): torch's OpenMP threads then sleep between parallel regions instead
of spinning, so they do not take the cores of the decode workers. Measured on 2 cores (`benchmarks.step_speed`,
back to back): the demo with 1 worker and 2 torch threads waited for data 36-40% of its step with spinning threads
and 0.5% with sleeping ones; PushT (64 px) with 1 worker and 2 threads ran 34 clips/s either way, with 1 thread 21.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
