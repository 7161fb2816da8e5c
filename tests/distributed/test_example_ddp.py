"""examples/ddp_torchrun.py under torchrun with 2 gloo processes (DDP, and FSDP2 with the
fused AdamW) trains exactly like one process on the concatenated batches of both ranks
(plain torch, mean over every real token of the window)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.launch import torchrun
from tests.helpers import assert_close_rel

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ddp_torchrun.py"
STEPS, K, WORLD = 3, 4, 2


def load_example():
    spec = importlib.util.spec_from_file_location("ddp_torchrun", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference(example) -> tuple[dict[str, torch.Tensor], int]:
    """Single-process training on both ranks' windows; (state_dict, tokens seen)."""
    model = example.make_model()
    opt = example.make_optimizer(model.parameters())
    streams = [example.micro_batches(r, STEPS * K) for r in range(WORLD)]
    seen = 0
    for w in range(STEPS):
        window = [b for r in range(WORLD) for b in streams[r][w * K : (w + 1) * K]]
        tokens = sum(int((y != example.PAD).sum()) for _, y in window)
        summed = sum(
            F.cross_entropy(
                model(x).flatten(0, 1), y.flatten(), ignore_index=example.PAD, reduction="sum"
            )
            for x, y in window
        )
        (summed / tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        seen += tokens
    return model.state_dict(), seen


@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_example_matches_single_process_training(tmp_path: Path, mode: list[str]) -> None:
    saved = tmp_path / "model.pt"
    lines = torchrun(EXAMPLE, "--steps", str(STEPS), "--save", str(saved), *mode, world=WORLD)
    want, tokens = reference(load_example())
    assert [line["step"] for line in lines[:-1]] == [1, 2, 3]
    assert lines[-1]["summary"] == {
        "world": WORLD,
        "windows": STEPS,
        "items_seen": float(tokens),
        "ranks_in_sync": True,
    }
    got = torch.load(saved)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert_close_rel(got[name], tensor, 1e-5)
