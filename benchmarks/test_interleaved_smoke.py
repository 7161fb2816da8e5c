"""Smoke test of benchmarks/cpu_interleaved.py: the replayed-gradient suites run, every
provider gets a row with a positive ratio to native, and a bad provider list is refused."""

import math

import cpu_interleaved
import pytest
import test_wrapper_cpu


def _rows(out: str) -> dict[str, float]:
    rows = {}
    for line in out.splitlines()[1:]:
        name, ratio = line.split()[:2]
        rows[name] = float(ratio.rstrip("x"))
    return rows


@pytest.mark.parametrize(
    ("suite", "providers"),
    [
        ("replay", test_wrapper_cpu.REPLAY_PROVIDERS),
        ("replay_amsgrad", test_wrapper_cpu.REPLAY_PROVIDERS),
        ("replay_bf16", test_wrapper_cpu.MASTER_PROVIDERS),
        ("replay_muon", test_wrapper_cpu.MUON_PROVIDERS),
    ],
)
def test_replay_suites_run(capsys, suite, providers):
    assert cpu_interleaved.main([suite, "--rounds", "3"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == providers
    assert rows["native"] == 1.0
    assert all(math.isfinite(r) and r > 0 for r in rows.values())


def test_unknown_provider_is_refused(capsys):
    assert cpu_interleaved.main(["replay_bf16", "--providers", "native,fused"]) == 2
    assert "replay_bf16 suite" in capsys.readouterr().err
