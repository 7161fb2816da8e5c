"""Test-wide setup.

Triton kernels run on the CPU under the Triton interpreter when no CUDA GPU is present.
The variable must be set before anything imports triton, hence here, at collection.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every device this machine has: the CPU, and CUDA when a GPU is present."""
    return torch.device(request.param)
