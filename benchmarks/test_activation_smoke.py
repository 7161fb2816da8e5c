"""Smoke test of benchmarks/activation_memory.py with tiny shapes (seconds): every
measurement runs and the Markdown report holds its tables."""

import re

import pytest

pytest.importorskip("sklearn", reason="activation_memory trains on scikit-learn's digits")

import activation_memory


def test_smoke_run_writes_the_report(tmp_path):
    out = tmp_path / "activation_memory.md"
    assert activation_memory.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    assert "torch " in text and "commit " in text
    gpt_table = text.split("## GPT")[1].split("## CNN")[0]
    rows = {m[1]: m[2] for m in re.finditer(r"^\| ([^|]+?) \| (.+)$", gpt_table, re.M)}
    for mode in ("plain PyTorch", "8-bit", "checkpoint + masks only", "checkpoint + 8-bit"):
        assert mode in rows
    # Lossless modes reproduce the exact gradients; 8 bits at least 3x smaller than plain.
    assert rows["checkpoint + masks only"].endswith("| 0.00e+00 |")
    ratio = float(re.search(r"\| ([\d.]+)x smaller", rows["8-bit"]).group(1))
    assert ratio > 3
    assert "## Training on scikit-learn's digits" in text and "| exact |" in text
