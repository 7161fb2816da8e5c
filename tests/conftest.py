"""Test-wide setup.

Triton kernels run on the CPU under the Triton interpreter when no CUDA GPU is present.
The variable must be set before anything imports triton, hence here, at collection.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_scalar_index() -> None:
    """Let Triton 3.6's interpreter use a loaded scalar as a ``range`` bound under NumPy 2.4.

    The interpreter keeps a scalar as a one-element array, and its ``tensor.__index__`` calls
    ``int()`` on that array, which NumPy 2.4 refuses ("only 0-dimensional arrays can be
    converted to Python scalars"). Every kernel with a loop over a loaded length then fails
    on the CPU, although it compiles and runs on a GPU. Newer Triton squeezes the array
    first; this gives older ones the same ``__index__``. Compiled kernels are untouched.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "scalar_index", False):
        return

    def scalar_index(self) -> int:
        return int(self.handle.data.squeeze())

    def patch_with_scalar_index(tensor, *scope) -> None:
        patch_tensor(tensor, *scope)  # older Triton patches for good and passes no scope
        if scope:
            scope[0].set_attr(tensor, "__index__", scalar_index)
        else:
            tensor.__index__ = scalar_index

    patch_with_scalar_index.scalar_index = True
    interpreter._patch_lang_tensor = patch_with_scalar_index


_interpreter_scalar_index()

DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every device this machine has: the CPU, and CUDA when a GPU is present."""
    return torch.device(request.param)
