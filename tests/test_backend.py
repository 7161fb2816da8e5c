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
