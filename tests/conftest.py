"""Suite-wide settings.

Two pytest-xdist workers share the machine's 2 cores: each worker (and every subprocess it starts) uses one
intra-op thread. Oversubscribed OpenMP threads spin at barriers and made convolutions over 10x slower.
"""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
