"""fastaccum._backend: the choice of implementation per device, and forced choices."""

import importlib.machinery
import shutil
import subprocess

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
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    for op in _backend.OPS:
        assert info["ops"][op] == {d: _backend.select(d, op=op) for d in devices}
    assert info["extension"] == _backend.has_extension()
    assert len(info["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_ops_lists_every_op_that_selects_a_backend():
    """OPS (what ``fastaccum info`` lists) holds each op that fastaccum._C registers."""
    registered = {op for op, _ in _backend._NATIVE_KERNELS}
    assert registered <= set(_backend.OPS)
    if _backend.has_extension():
        assert registered == set(_backend.OPS)


def test_extension_status_says_why(monkeypatch):
    module, why = _backend._load_extension()
    assert (module is not None) == _backend.has_extension()
    assert why == _backend.extension_status()
    assert _backend._load_extension("fastaccum._not_built")[1].startswith("not built")
    monkeypatch.setenv("FASTACCUM_NO_EXT", "1")
    assert _backend._load_extension() == (None, "not loaded: FASTACCUM_NO_EXT is set")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the broken module")
def test_an_extension_that_fails_to_load_warns_and_says_why(tmp_path, monkeypatch):
    """A real compiled module that needs a symbol nothing defines, as an extension built
    against another torch does: the import fails at load, and fastaccum says so instead of
    falling back to the reference in silence."""
    package = tmp_path / "brokenext"
    package.mkdir()
    (package / "__init__.py").write_text("")
    source = tmp_path / "broken.c"
    source.write_text(
        "extern void *fastaccum_missing_symbol(void);\n"
        "void *PyInit__C(void) { return fastaccum_missing_symbol(); }\n"
    )
    library = package / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning, match=r"brokenext\._C is built but fails to load"):
        module, why = _backend._load_extension("brokenext._C")
    assert module is None
    assert "fastaccum_missing_symbol" in why
    assert f"rebuild it against the installed torch {torch.__version__}" in why


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


def test_version_matches_the_installed_metadata():
    """``fastaccum.__version__`` is the version pip installed (pyproject.toml's)."""
    from importlib.metadata import version

    import fastaccum

    assert fastaccum.__version__ == version("fastaccum")
