"""Test-session settings that must exist before torch is imported."""

import os

# OpenMP threads that spin while waiting for work steal the CPU from the other processes many tests start
# (torchrun workers, CLI subprocesses); sleeping instead keeps the suite fast on a 2-core machine.
# Subprocesses inherit it through the environment.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
