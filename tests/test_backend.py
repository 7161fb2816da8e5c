"""fastaccum._backend: the choice of implementation per device, and forced choices."""

import pytest
import torch

from fastaccum import _backend


def test_cpu_uses_native_when_built():
    expected = _backend.NATIVE if _backend.has_extension() else _backend.REFERENCE
    assert _backend.select("cpu") == expected


def test_devices_without_kernels_use_the_reference():
    assert _backend.select("meta") == _backend.REFERENCE


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU routing")
def test_triton_is_not_chosen_without_a_gpu():
    """An importable Triton must not be taken for a working one."""
    assert _backend.select("cpu") != _backend.TRITON
    assert not _backend.triton_can_run(torch.device("meta"))


def test_forced_backend_that_cannot_run_raises():
    with pytest.raises(RuntimeError, match="cannot run on meta"):
        _backend.select("meta", "native")
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.select("cpu", "fast")


def test_environment_variable_forces_the_backend(monkeypatch):
    monkeypatch.setenv("FASTACCUM_BACKEND", "reference")
    assert _backend.select("cpu") == _backend.REFERENCE
    monkeypatch.setenv("FASTACCUM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTACCUM_BACKEND must be one of"):
        _backend.select("cpu")


def test_describe_reports_each_device():
    info = _backend.describe()
    assert info["torch"] == torch.__version__
    assert info["cpu"] in _backend.BACKENDS


def test_import_is_light():
    """`import fastaccum` loads neither Triton nor torch._dynamo: Triton must not be imported
    before TRITON_INTERPRET can be set, and importing should stay cheap."""
    import subprocess
    import sys

    code = "import sys, fastaccum; print('triton' in sys.modules, 'torch._dynamo' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False"]


def test_native_kernels_are_listed_per_op_and_device():
    if not _backend.has_extension():
        pytest.skip("FASTACCUM_NO_EXT=1: pure-Python install")
    for op in ("accumulate_", "finalize_", "sgd_window_step_", "adam_window_step_"):
        assert _backend.native_can_run(torch.device("cpu"), op)
    assert not _backend.native_can_run(torch.device("cpu"), "no_such_op_")
