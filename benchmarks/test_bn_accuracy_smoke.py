"""Smoke test of benchmarks/bn_accuracy.py with tiny settings (seconds): every run trains
and is evaluated, and the Markdown table has a row per run."""

import dataclasses
import math

import pytest

pytest.importorskip("sklearn", reason="bn_accuracy needs scikit-learn (load_digits)")

import bn_accuracy


def test_tiny_experiment_runs_every_mode_and_writes_the_table(tmp_path):
    cfg = bn_accuracy.Config(
        seeds=(0,), epochs=1, train_size=64, width=8, renorm={"plain_windows": 1}
    )
    results = bn_accuracy.run_experiment(cfg, progress=False)
    assert list(results) == list(cfg.runs)
    for accs in results.values():
        assert len(accs) == 1 and 0.0 <= accs[0] <= 100.0 and math.isfinite(accs[0])
    # Same seed, same initial weights and sample order: a run repeats exactly.
    again = bn_accuracy.run_experiment(dataclasses.replace(cfg, runs=("window-2x16",)), False)
    assert again["window-2x16"] == results["window-2x16"]
    out = tmp_path / "table.md"
    bn_accuracy.main(
        [
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--train-size",
            "64",
            "--width",
            "4",
            "--runs",
            "bn-32",
            "renorm-2x16",
            "--plain-windows",
            "0",
            "--no-fc-norm",
            "--out",
            str(out),
        ]
    )
    table = out.read_text()
    assert "| BatchNorm, true batch 32 |" in table
    assert "| fastaccum `renorm`, micro-batch 2 x 16 |" in table
    assert "plain_windows=0" in table and "no norm on the hidden FC layer" in table


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="multiple of batch"):
        bn_accuracy.run_experiment(bn_accuracy.Config(train_size=100), progress=False)
