"""Text for the training bench: bytes of real text, cut into deterministic batches.

With no file given, the text is the Python standard library's own top-level ``.py``
sources (the directory of the ``os`` module), which every Python installation has, so the
bench needs no download. Tokens are bytes (vocabulary 256).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

VOCAB = 256
"""Byte-level vocabulary size."""


def stdlib_sources() -> list[Path]:
    """The standard library's top-level ``.py`` files, sorted by name (so the same on every run)."""
    return sorted(Path(os.__file__).parent.glob("*.py"))


def load_bytes(path: str | os.PathLike[str] | None = None) -> torch.Tensor:
    """The bytes of ``path`` (any file), or of the standard library sources when ``None``,
    as a 1-D uint8 tensor.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        ValueError: the text is empty.
    """
    if path is None:
        files = stdlib_sources()
        name = f"the standard library sources in {Path(os.__file__).parent}"
    else:
        files = [Path(path)]
        name = str(path)
        if not files[0].is_file():
            raise FileNotFoundError(f"--data {path}: no such file; give a text file to train on")
    raw = b"\n".join(f.read_bytes() for f in files)
    if not raw:
        raise ValueError(f"{name} holds no bytes; give a non-empty text file")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


class ByteBatches:
    """Windows of K micro-batches of (tokens, next tokens) cut from ``text`` at random
    offsets. Window ``i`` depends only on (``seed``, ``i``), so every run of the bench sees
    the same batches in the same order.

    Raises:
        ValueError: ``text`` is shorter than ``seq + 1`` bytes, or a size is < 1.
    """

    def __init__(
        self, text: torch.Tensor, micro_batch: int, accum_steps: int, seq: int, seed: int
    ) -> None:
        for name, value in (
            ("micro_batch", micro_batch),
            ("accum_steps", accum_steps),
            ("seq", seq),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if text.numel() < seq + 1:
            raise ValueError(
                f"the text holds {text.numel()} bytes but one sequence needs {seq + 1}; "
                "give a longer file or a model with a shorter context"
            )
        self.text = text
        self.micro_batch = micro_batch
        self.accum_steps = accum_steps
        self.seq = seq
        self.seed = seed

    @property
    def tokens_per_window(self) -> int:
        """Tokens (predicted positions) per optimizer step: K x b x seq."""
        return self.accum_steps * self.micro_batch * self.seq

    def sample(
        self, n: int, step: int, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` sequences for step ``step``: (n, seq) int64 inputs and targets (the inputs
        shifted by one byte). The same (n, step) gives the same sequences."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.text.numel() - self.seq, (n,), generator=gen)
        rows = torch.stack([self.text[s : s + self.seq + 1] for s in starts.tolist()]).long()
        rows = rows.to(device)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def window(
        self, step: int, device: torch.device | str = "cpu"
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The K micro-batches of optimizer step ``step``, (b, seq) inputs and targets each.

        They are the K x b sequences of :meth:`sample` cut in order, so any split of the
        same K x b (another micro-batch size) trains on the same sequences.
        """
        x, y = self.sample(self.accum_steps * self.micro_batch, step, device)
        return list(zip(x.split(self.micro_batch), y.split(self.micro_batch), strict=True))
