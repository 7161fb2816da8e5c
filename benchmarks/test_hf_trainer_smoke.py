"""Smoke test of benchmarks/cpu_hf_trainer.py (one layer, small vocabulary, 2 steps)."""

from pathlib import Path

import pytest

pytest.importorskip("transformers")

import cpu_hf_trainer

from tests.distributed.launch import torchrun


def test_cpu_hf_trainer_script_runs(capsys):
    args = ["--rounds", "1", "--steps", "2", "--layers", "1", "--vocab", "512", "--seq", "16"]
    results = cpu_hf_trainer.main([*args, "--accum-steps", "2"])
    assert set(results) == {"trainer", "fastaccum", "fastaccum.fused"}
    # The first window is Trainer's; the norms differ by the error of torch's fp32 norm on
    # the CPU (3e-5 here; fastaccum's agrees with the float64 norm of the same gradient).
    for name in ("fastaccum", "fastaccum.fused"):
        assert results[name]["grad_norm_diff"] < 1e-4
    assert results["fastaccum.fused"]["peak"] < 1.0  # no dW tensor, no .grad set
    assert "| fastaccum.fused |" in capsys.readouterr().out


def test_cpu_hf_trainer_script_runs_under_torchrun(tmp_path):
    """The same, as Trainer's DDP on 2 gloo processes (the script's torchrun mode): rank 0
    appends the report."""
    out = tmp_path / "report.md"
    torchrun(
        Path(cpu_hf_trainer.__file__),
        *["--threads", "1", "--rounds", "1", "--steps", "2", "--layers", "1"],
        *["--vocab", "512", "--seq", "16", "--accum-steps", "2", "--out", str(out)],
    )
    report = out.read_text()
    assert "DDP over 2 gloo processes" in report
    assert report.count("| fastaccum") == 2 and "| trainer |" in report
