"""Test-session settings.

Under pytest-xdist (``make test`` runs ``-n 2``: one worker per core of the CI machine) each
worker, and every subprocess it starts, computes on one thread: two workers with torch's
default of one thread per core would oversubscribe the cores. Tests that ask for threads
themselves (``threads=2`` in a config) still get them.
"""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
