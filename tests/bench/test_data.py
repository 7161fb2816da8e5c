"""The bench's text and batches (fastaccum.bench.data) and its model (workloads.ByteGPT)."""

import pytest
import torch

from fastaccum.bench.data import ByteBatches, load_bytes
from fastaccum.workloads import ByteGPT

# Bytes that count up modulo 251: a slice of the text is recognisable by its steps of +1.
TEXT = (torch.arange(5000) % 251).to(torch.uint8)


def test_stdlib_text_is_real_python_source():
    text = load_bytes()
    assert text.dtype == torch.uint8 and text.numel() > 100_000
    assert b"def " in bytes(text[:200_000].tolist())


def test_windows_are_consecutive_text_with_next_byte_targets():
    batches = ByteBatches(TEXT, micro_batch=3, accum_steps=2, seq=17, seed=5)
    window = batches.window(0)
    assert len(window) == 2
    for x, y in window:
        assert x.shape == y.shape == (3, 17) and x.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])  # targets: the inputs shifted by one byte
        assert torch.equal((x[:, 1:] - x[:, :-1]) % 251, torch.ones(3, 16, dtype=torch.int64))
        assert torch.equal((y[:, -1] - x[:, -1]) % 251, torch.ones(3, dtype=torch.int64))


def test_windows_depend_only_on_seed_and_step():
    a = ByteBatches(TEXT, 2, 3, 16, seed=1)
    b = ByteBatches(TEXT, 2, 3, 16, seed=1)
    for step in (0, 7):
        for (xa, ya), (xb, yb) in zip(a.window(step), b.window(step), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.window(0)[0][0], a.window(1)[0][0])
    assert not torch.equal(a.window(0)[0][0], ByteBatches(TEXT, 2, 3, 16, seed=2).window(0)[0][0])


def test_any_split_of_a_window_holds_the_same_sequences():
    whole, _ = ByteBatches(TEXT, 6, 1, 16, seed=3).sample(6, step=4)
    for micro, k in ((1, 6), (2, 3), (3, 2)):
        window = ByteBatches(TEXT, micro, k, 16, seed=3).window(4)
        assert torch.equal(torch.cat([x for x, _ in window]), whole)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"micro_batch": 0}, "micro_batch must be >= 1, got 0"),
        ({"accum_steps": -2}, "accum_steps must be >= 1, got -2"),
        ({"seq": 5000}, "holds 5000 bytes but one sequence needs 5001"),
    ],
)
def test_bad_sizes_are_rejected(kwargs, message):
    args = {"micro_batch": 2, "accum_steps": 2, "seq": 16, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        ByteBatches(TEXT, **args)


def test_load_bytes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_bytes(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="holds no bytes"):
        load_bytes(empty)
    text = tmp_path / "t.txt"
    text.write_bytes(b"abc\xff")
    assert load_bytes(text).tolist() == [97, 98, 99, 255]


def test_byte_gpt_shapes_and_context_limit():
    torch.manual_seed(0)
    model = ByteGPT(dim=32, heads=2, layers=1, ctx=16)
    logits = model(torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256)
    # embeddings start small, so an untrained model predicts nearly uniformly
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(0, 256, (48,)))
    assert loss.item() == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.3)
    with pytest.raises(ValueError, match="sequence length 17 exceeds the model's context 16"):
        model(torch.randint(0, 256, (1, 17)))
