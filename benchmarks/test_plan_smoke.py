"""Smoke test of benchmarks/gpu_plan.py on the CPU (tiny model, budget mode, no CSV)."""

import gpu_plan


def test_gpu_plan_script_runs_on_cpu(capsys):
    assert gpu_plan.main(["--device", "cpu", "--smoke"]) == 0
    out = capsys.readouterr().out
    assert "100% of exhaustive" in out
    assert "real run ok" in out
