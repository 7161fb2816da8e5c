"""examples/hf_trainer_torchrun.py under torchrun with 2 gloo processes: accelerate sets up
the process group and the DDP itself, as in a real launch, and FastaccumTrainer (with
fuse_wgrad) makes the same updates as stock Trainer's DDP accumulation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import torchrun

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer_torchrun.py"
STEPS = 3


def test_fastaccum_trainer_under_torchrun_matches_trainer(tmp_path: Path) -> None:
    ours_path, native_path = tmp_path / "fastaccum.pt", tmp_path / "native.pt"
    (ours,) = torchrun(EXAMPLE, "--steps", str(STEPS), "--fuse-wgrad", "--save", str(ours_path))
    (native,) = torchrun(EXAMPLE, "--steps", str(STEPS), "--native", "--save", str(native_path))
    assert ours["world"] == native["world"] == 2
    assert ours["windows"] == STEPS and ours["drives_ddp"] is True
    for key in ("losses", "grad_norms"):
        assert len(ours[key]) == len(native[key]) == STEPS
        for a, b in zip(ours[key], native[key], strict=True):
            assert math.isclose(a, b, rel_tol=1e-5), (key, ours[key], native[key])
    got, want = torch.load(ours_path), torch.load(native_path)
    assert got.keys() == want.keys()
    # Over the whole model: AdamW (eps 1e-8) turns the rounding noise of gradients that are
    # zero in exact arithmetic (GPT-2's key biases) into full-size steps in either run.
    diff = sum(((got[k] - want[k]) ** 2).sum() for k in want)
    norm = sum((want[k] ** 2).sum() for k in want)
    assert math.sqrt(diff / norm) <= 1e-6
    assert ours["moved"] > 1e-3 and math.isclose(ours["moved"], native["moved"], rel_tol=1e-3)
