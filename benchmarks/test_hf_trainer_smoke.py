"""Smoke test of benchmarks/cpu_hf_trainer.py (one layer, small vocabulary, 2 steps)."""

import pytest

pytest.importorskip("transformers")

import cpu_hf_trainer


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
