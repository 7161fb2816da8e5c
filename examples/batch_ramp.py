"""Grow the batch during training, following the gradient noise scale, at fixed memory.

An MLP learns scikit-learn's ``load_digits`` (1,797 8x8 images, shipped inside the
package: no download) from micro-batches of 8 images. The wrapper starts at K = 2
micro-batches per optimizer step. After each step it reads the gradient noise scale
(``opt.stats()["noise_scale"]``, in images since ``num_items`` is given), which grows as
the loss falls. When the noise scale exceeds twice the window, K doubles
(``opt.accum_steps *= 2``), up to ``--max-accum-steps``. The micro-batch, and so the
activation memory, never changes.

    python examples/batch_ramp.py            # 6 epochs; prints the schedule and accuracy
    python examples/batch_ramp.py --smoke    # 40 optimizer steps, asserts the outcome (CI)

Over the 6 epochs (seed 0) K went 2 -> 4 -> 8 -> 16 -> 32: 107 optimizer steps to 94.3%
test accuracy, against 564 steps and 95.3% at a fixed K = 2 and 36 steps and 90.9% at a
fixed K = 32 (``--accum-steps 32 --max-accum-steps 32``).

The run then replays its own schedule with plain PyTorch: a fresh model of the same
initialization, one backward per window over all of that window's images, AdamW. Every
window of the fastaccum run, whatever its K, must give the update of that large batch.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import fastaccum


def make_model(seed: int) -> torch.nn.Sequential:
    """64 -> 128 -> 10 with a GELU."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10)
    )


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels): images scaled to [0, 1], a
    seeded shuffle, the last 297 held out for testing."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def replay_natively(
    seed: int, lr: float, x: torch.Tensor, y: torch.Tensor, windows: list[torch.Tensor]
) -> torch.nn.Module:
    """Plain PyTorch on the recorded schedule: one backward per window on the mean loss
    over every image of the window, then ``AdamW.step``."""
    model = make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for idx in windows:
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
    return model


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Train, print a summary, and return it: the schedule (window at which K changed, new
    K, noise scale then), per-step losses, test accuracy, and the largest deviation from the
    native replay."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--micro-batch", type=int, default=8, help="images per micro-batch")
    parser.add_argument("--accum-steps", type=int, default=2, help="K to start with")
    parser.add_argument("--max-accum-steps", type=int, default=32, help="K stops growing here")
    parser.add_argument(
        "--settle", type=int, default=10, help="optimizer steps between two changes of K"
    )
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="40 steps; asserts the outcome")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = 40
    for name in ("epochs", "micro_batch", "accum_steps", "max_accum_steps", "settle"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    train_x, train_y, test_x, test_y = load_data(args.seed)
    model = make_model(args.seed)
    opt = fastaccum.wrap(
        torch.optim.AdamW(model.parameters(), lr=args.lr), args.accum_steps, model=model
    )
    schedule: list[dict[str, float]] = []
    losses: list[float] = []
    windows: list[torch.Tensor] = []  # the images of each window, for the replay
    held: list[torch.Tensor] = []
    window_loss = 0.0
    gen = torch.Generator().manual_seed(args.seed)
    done = False
    for _ in range(args.epochs):
        for idx in torch.randperm(len(train_y), generator=gen).split(args.micro_batch):
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            window_loss += loss.item() * len(idx)
            held.append(idx)
            opt.backward(loss, num_items=len(idx))
            if not opt.step():
                continue
            images = torch.cat(held)
            windows.append(images)
            losses.append(window_loss / len(images))
            held, window_loss = [], 0.0
            noise = opt.stats()["noise_scale"]  # images
            window = opt.accum_steps * args.micro_batch
            since = len(windows) - (schedule[-1]["window"] if schedule else 0)
            grow = noise is not None and noise > 2 * window and since >= args.settle
            if grow and opt.accum_steps < args.max_accum_steps:
                opt.accum_steps = min(2 * opt.accum_steps, args.max_accum_steps)
                schedule.append({"window": len(windows), "accum_steps": opt.accum_steps,
                                 "noise_scale": round(noise, 1)})  # fmt: skip
            if args.steps is not None and len(windows) >= args.steps:
                done = True
                break
        if done:
            break
    if opt.flush():  # a partial window at the end of the data steps on what it held
        windows.append(torch.cat(held))

    native = replay_natively(args.seed, args.lr, train_x, train_y, windows)
    deviation = max(
        ((p - q).norm() / q.norm()).item()
        for p, q in zip(model.parameters(), native.parameters(), strict=True)
    )
    summary: dict[str, object] = {
        "schedule": schedule,
        "optimizer_steps": len(windows),
        "images_seen": sum(len(w) for w in windows),
        "final_accum_steps": opt.accum_steps,
        "losses": [round(x, 4) for x in losses],
        "test_accuracy": accuracy(model, test_x, test_y),
        "max_rel_deviation_from_native_replay": deviation,
    }
    print(json.dumps(summary, indent=1))
    if args.smoke:
        assert all(math.isfinite(x) for x in losses), losses
        assert sum(losses[-5:]) < sum(losses[:5]), f"loss did not go down: {losses}"
        assert schedule, "K never grew: the noise scale stayed below twice the window"
        assert deviation <= 1e-5, deviation
    return summary


if __name__ == "__main__":
    main()
