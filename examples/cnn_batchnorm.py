"""Train a small CNN with BatchNorm on micro-batches, with BatchNorm made accumulation-aware.

The data is scikit-learn's ``load_digits`` (1,797 8x8 images of handwritten digits,
shipped inside the package: no download). The effective batch is 32, trained as K = 8
micro-batches of 4 images. With plain ``nn.BatchNorm2d`` the running statistics would be
updated 8 times per step from 4 images each; ``fastaccum.convert_batchnorm`` merges each
micro-batch's statistics into the window's and updates the running statistics once per
optimizer step, as a batch of 32 would (``fastaccum.wrap(..., model=model)`` closes the
window at each step).

    python examples/cnn_batchnorm.py            # 3 epochs, prints loss and test accuracy
    python examples/cnn_batchnorm.py --smoke    # 6 optimizer steps, asserts the outcome (CI)

The run also checks the first BatchNorm's running statistics after the first window
against a native ``nn.BatchNorm2d`` that saw the whole window as one batch of 32, and
prints how far the unconverted BatchNorm on micro-batches lands from the same target.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import fastaccum


def make_model(seed: int) -> torch.nn.Sequential:
    """Two 3x3 conv layers with BatchNorm and ReLU, a 2x2 max-pool, a linear classifier."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 10),
    )


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels): images (n, 1, 8, 8) scaled
    to [0, 1]; a seeded shuffle, the last 297 images held out for testing."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def window_stats_error(model: torch.nn.Module, window_x: torch.Tensor, micro: int) -> dict:
    """Largest error of the first BatchNorm's running (mean, var) after one window, against
    ``nn.BatchNorm2d`` fed the whole window at once: for the converted layer, and for an
    unconverted one fed the same micro-batches. ``model`` is left unchanged."""
    target = copy.deepcopy(model[:2]).train()
    target(window_x)
    errors = {}
    for name, convert in (("fastaccum", True), ("native_micro_batches", False)):
        layers = copy.deepcopy(model[:2]).train()
        if convert:
            fastaccum.convert_batchnorm(layers)
        with torch.no_grad():
            for chunk in window_x.split(micro):
                layers(chunk)
        if convert:
            fastaccum.nn.end_window(layers)
        errors[name] = max(
            (layers[1].running_mean - target[1].running_mean).abs().max().item(),
            (layers[1].running_var - target[1].running_var).abs().max().item(),
        )
    return errors


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y``, in eval mode (running statistics)."""
    model.eval()
    with torch.no_grad():
        right = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return right


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Train, print a summary, and return it: per-step losses, test accuracy before and
    after, and the running-statistics errors of :func:`window_stats_error`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--micro-batch", type=int, default=4, help="images per micro-batch")
    parser.add_argument("--accum-steps", type=int, default=8, help="micro-batches per step, K")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="6 steps; asserts the outcome")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = 6
    for name in ("epochs", "micro_batch", "accum_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    train_x, train_y, test_x, test_y = load_data(args.seed)
    model = make_model(args.seed)
    window = args.micro_batch * args.accum_steps
    stats_error = window_stats_error(model, train_x[:window], args.micro_batch)

    fastaccum.convert_batchnorm(model)
    opt = fastaccum.wrap(
        torch.optim.AdamW(model.parameters(), lr=args.lr), args.accum_steps, model=model
    )
    before = accuracy(model, test_x, test_y)
    losses: list[float] = []
    window_loss = 0.0
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        # load_data already shuffled: epoch 0 keeps that order (its first window is the one
        # window_stats_error checked), later epochs reshuffle
        n = len(train_y)
        order = torch.arange(n) if epoch == 0 else torch.randperm(n, generator=gen)
        for idx in order.split(args.micro_batch):
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            loss.backward()
            window_loss += loss.item() / args.accum_steps
            if opt.step():
                losses.append(window_loss)
                window_loss = 0.0
            opt.zero_grad()
            if args.steps is not None and len(losses) >= args.steps:
                break
        if args.steps is not None and len(losses) >= args.steps:
            break
    opt.flush()  # a partial window at the end of the data still steps, correctly scaled
    summary: dict[str, object] = {
        "losses": losses,
        "test_accuracy_before": before,
        "test_accuracy": accuracy(model, test_x, test_y),
        "running_stats_error": stats_error,
    }
    print(json.dumps(summary, indent=1))
    if args.smoke:
        assert all(math.isfinite(x) for x in losses), losses
        assert sum(losses[-2:]) < sum(losses[:2]), f"loss did not go down: {losses}"
        assert stats_error["fastaccum"] <= 1e-5, stats_error
        assert stats_error["native_micro_batches"] > 100 * stats_error["fastaccum"], stats_error
    return summary


if __name__ == "__main__":
    main()
