"""Smoke tests of the GPU scripts on the CPU (``--device cpu --smoke``: tiny sizes, no CSV),
so that a GPU session finds them working. gpu_accumulate.py times with
``triton.testing.do_bench`` and runs on CUDA only; gpu_plan.py has test_plan_smoke.py."""

import gpu_activation_memory
import gpu_batchnorm
import gpu_wgrad
import gpu_wrapper
import pytest


def rows(out: str, providers) -> dict[str, list[str]]:
    """The printed table's row of each provider, split into fields."""
    found = {}
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] in providers:
            found[fields[0]] = fields
    assert sorted(found) == sorted(providers), out
    return found


@pytest.mark.parametrize("extra", [[], ["--seq", "8"]], ids=["context", "short-seq"])
def test_gpu_wrapper_runs_on_cpu_and_providers_agree(extra, tmp_path, capsys):
    out_csv = tmp_path / "wrapper.csv"
    assert gpu_wrapper.main(["--device", "cpu", "--smoke", "--out", str(out_csv), *extra]) == 0
    table = rows(capsys.readouterr().out, gpu_wrapper.PROVIDERS)
    # every provider trained the same windows as native: relative parameter deviation
    for provider, fields in table.items():
        assert float(fields[-1]) < 1e-5, provider
    assert not out_csv.exists()  # CSVs hold GPU figures only


def test_gpu_wrapper_rejects_a_sequence_longer_than_the_context(capsys):
    assert gpu_wrapper.main(["--device", "cpu", "--smoke", "--seq", "33"]) == 2
    assert "--seq must be in 1..32" in capsys.readouterr().err


def test_gpu_wgrad_runs_on_cpu(tmp_path, capsys):
    out_csv = tmp_path / "wgrad.csv"
    assert gpu_wgrad.main(["--device", "cpu", "--smoke", "--out", str(out_csv)]) == 0
    rows(capsys.readouterr().out, gpu_wgrad.PROVIDERS)
    assert not out_csv.exists()


def test_gpu_activation_memory_runs_on_cpu(tmp_path, capsys):
    out_csv = tmp_path / "activations.csv"
    args = ["--device", "cpu", "--smoke", "--out", str(out_csv)]
    assert gpu_activation_memory.main(args) == 0
    rows(capsys.readouterr().out, gpu_activation_memory.PROVIDERS)
    assert not out_csv.exists()


def test_gpu_batchnorm_runs_on_cpu(tmp_path, capsys):
    out_csv = tmp_path / "bn.csv"
    assert gpu_batchnorm.main(["--device", "cpu", "--smoke", "--out", str(out_csv)]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and len(out.splitlines()) > 2
    assert not out_csv.exists()
