"""Activation memory under fastaccum's activation policy, measured on the CPU.

Three measurements, all against plain PyTorch in the same run:

1. Counted saved-activation bytes (``fastaccum.memory.saved_bytes``: every storage autograd
   keeps for backward, parameters excluded) of a GPT-2-style block stack and of a CNN with
   BatchNorm and ReLU, at 8/4/2 bits and without quantization, with and without
   ``fastaccum.checkpoint`` per block; plus the CPU time of one forward+backward relative
   to plain PyTorch.
2. Gradient error against exact training: ``||g - g_exact|| / ||g_exact||`` over all
   parameter gradients, per bit width (and with checkpointing at 8 bits).
3. Training a small CNN (BatchNorm, ReLU) on scikit-learn's digits (1797 8x8 images,
   shipped with the package) with the same seeds, initial weights and sample order:
   exact vs 8/4/2 bits, final test accuracy and loss.

Writes benchmarks/results/activation_memory.md (machine, torch, commit, date) unless
``--smoke`` (a seconds-long run on tiny shapes for CI) or ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastaccum.memory import ActivationPolicy, checkpoint, save_activations, saved_bytes
from fastaccum.workloads import GPT2Blocks

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "activation_memory.md"
BITS = (None, 8, 4, 2)


@dataclass
class Config:
    """Sizes of every measurement (``smoke()`` shrinks them for CI)."""

    gpt_blocks: int = 2
    gpt_width: int = 768
    gpt_heads: int = 12
    gpt_batch: int = 4
    gpt_seq: int = 256
    cnn_width: int = 32
    cnn_batch: int = 32
    cnn_image: int = 32
    bits: tuple[int | None, ...] = BITS
    time_reps: int = 0  # forward+backward timings per mode; 0: no timing
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 20
    train_batch: int = 32
    train_bits: tuple[int | None, ...] = (None, 8, 4, 2)
    group_size: int = 256
    min_bytes: int = 4096
    train_limit: int | None = None  # training images used (None: all 1437)

    @classmethod
    def smoke(cls) -> Config:
        return cls(
            gpt_blocks=1,
            gpt_width=64,
            gpt_heads=2,
            gpt_batch=2,
            gpt_seq=16,
            cnn_width=8,
            cnn_batch=4,
            cnn_image=8,
            bits=(None, 8),
            time_reps=0,
            seeds=(0,),
            epochs=1,
            train_bits=(None, 8),
            train_limit=128,
        )

    def policy(self, bits: int | None, seed: int = 0) -> ActivationPolicy:
        return ActivationPolicy(
            bits=bits, min_bytes=self.min_bytes, group_size=self.group_size, seed=seed
        )


# --------------------------------------------------------------------------- workloads


class Stack(torch.nn.Module):
    """Blocks applied in order; with ``ckpt`` each runs through ``fastaccum.checkpoint``."""

    def __init__(self, blocks: Sequence[torch.nn.Module], head: torch.nn.Module | None = None):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        self.head = head if head is not None else torch.nn.Identity()
        self.ckpt = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = checkpoint(block, h) if self.ckpt else block(h)
        return self.head(h)


def gpt_stack(cfg: Config) -> Stack:
    """GPT-2-style blocks (``fastaccum.workloads.GPT2Blocks``), one module per block."""
    torch.manual_seed(0)
    ff = 4 * cfg.gpt_width
    blocks = [
        GPT2Blocks(blocks=1, dim=cfg.gpt_width, heads=cfg.gpt_heads, ff=ff)
        for _ in range(cfg.gpt_blocks)
    ]
    return Stack(blocks)


def conv_bn_relu(c_in: int, c_out: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(c_out),
        torch.nn.ReLU(inplace=True),
    )


def cnn(width: int, classes: int = 10, in_channels: int = 3) -> Stack:
    """Conv-BN-ReLU stages with max pooling, then global pooling and a linear head."""
    w = width
    blocks = [
        torch.nn.Sequential(conv_bn_relu(in_channels, w), conv_bn_relu(w, w)),
        torch.nn.Sequential(
            torch.nn.MaxPool2d(2), conv_bn_relu(w, 2 * w), conv_bn_relu(2 * w, 2 * w)
        ),
    ]
    head = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2 * w, classes)
    )
    return Stack(blocks, head)


# --------------------------------------------------------------------------- measurements


@dataclass
class Row:
    workload: str
    mode: str
    total: int
    ratio: float
    per_sample: float
    time_ratio: float | None = None
    grad_error: float | None = None


def _grads(model: torch.nn.Module, x: torch.Tensor, policy: ActivationPolicy | None) -> list:
    model.zero_grad(set_to_none=True)
    if policy is None:
        out = model(x)
    else:
        with save_activations(policy):
            out = model(x)
    out.float().square().mean().backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def grad_error(got: list, exact: list) -> float:
    """``||g - g_exact|| / ||g_exact||`` over all parameter gradients, in float64."""
    num = sum((g.double() - e.double()).square().sum() for g, e in zip(got, exact, strict=True))
    den = sum(e.double().square().sum() for e in exact)
    return float((num / den).sqrt())


def _median_time(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_workload(name: str, model: Stack, x: torch.Tensor, cfg: Config) -> list[Row]:
    """Counted bytes, time ratio and gradient error of every mode on one workload (in
    training mode: BatchNorm normalizes with the batch statistics)."""
    rows = []
    model.ckpt = False
    model.train()
    base = saved_bytes(model, x)
    exact = _grads(model, x, None)
    base_time = None
    for ckpt in (False, True):
        model.ckpt = ckpt
        for bits in cfg.bits:
            if not ckpt and bits is None:
                policy = None
                mode = "plain PyTorch"
            else:
                policy = cfg.policy(bits)
                mode = ("checkpoint + " if ckpt else "") + (f"{bits}-bit" if bits else "masks only")
            print(f"{name}: {mode}", file=sys.stderr, flush=True)
            counted = saved_bytes(model, x, policy)
            g = _grads(model, x, policy)
            t = None
            if cfg.time_reps:
                t = _median_time(lambda p=policy: _grads(model, x, p), cfg.time_reps)
                base_time = base_time or t
            rows.append(
                Row(
                    name,
                    mode,
                    counted.total,
                    base.total / max(counted.total, 1),
                    counted.per_sample,
                    None if t is None else t / base_time,
                    grad_error(g, exact),
                )
            )
    model.ckpt = False
    return rows


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    bits: int | None
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (1, 8, 8) images scaled to [0, 1]; a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


def train_digits(cfg: Config, bits: int | None, seed: int, data) -> tuple[float, float]:
    """Train the CNN; returns (test accuracy in %, test loss). The seed fixes the initial
    weights, the sample order and the rounding; only ``bits`` differs between runs."""
    x_train, y_train, x_test, y_test = data
    if cfg.train_limit is not None:
        x_train, y_train = x_train[: cfg.train_limit], y_train[: cfg.train_limit]
    torch.manual_seed(seed)
    model = cnn(cfg.cnn_width, in_channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    policy = cfg.policy(bits, seed) if bits is not None else None
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(order), cfg.train_batch):
            idx = order[i : i + cfg.train_batch]
            if policy is None:
                loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            else:
                with policy:
                    loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(x_test)
        loss = torch.nn.functional.cross_entropy(logits, y_test).item()
        acc = (logits.argmax(1) == y_test).float().mean().item() * 100
    return acc, loss


def run_training(cfg: Config) -> list[TrainResult]:
    data = digits_split()
    results = []
    for bits in cfg.train_bits:
        r = TrainResult(bits)
        for seed in cfg.seeds:
            print(f"training: bits={bits} seed={seed}", file=sys.stderr, flush=True)
            acc, loss = train_digits(cfg, bits, seed, data)
            r.accuracy.append(acc)
            r.loss.append(loss)
        results.append(r)
    return results


# --------------------------------------------------------------------------- report


def _commit() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results_csv import commit

    return commit()


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def report(cfg: Config, tables: dict[str, list[Row]], training: list[TrainResult]) -> str:
    lines = [
        "# Activation memory: counted bytes, gradient error, training accuracy",
        "",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores "
        f"({platform.processor() or 'unknown processor'}), torch {torch.__version__}, "
        f"commit {_commit()}, {datetime.date.today().isoformat()}. "
        "Produced by `python benchmarks/activation_memory.py`.",
        "",
        f"Policy: `ActivationPolicy(bits=..., group_size={cfg.group_size}, "
        f"min_bytes={cfg.min_bytes})` (stochastic rounding; float32 scale and minimum per "
        f"group: {8 / cfg.group_size:.4f} extra bytes per element). Bytes are counted by "
        "`fastaccum.memory.saved_bytes`: every storage autograd keeps for backward, once, "
        "parameters excluded. Time (with `--time-reps`) is one forward+backward on this CPU "
        "relative to plain PyTorch in the same run (median; the quantization runs in the C++ "
        "kernel). Gradient error is `||g - g_exact|| / ||g_exact||` over all parameter "
        "gradients of one step.",
        "",
    ]
    timed = cfg.time_reps > 0
    for name, rows in tables.items():
        lines += [
            f"## {name}",
            "",
            "| mode | saved MiB | vs plain PyTorch | bytes per sample | "
            + ("time vs plain | " if timed else "")
            + "gradient error |",
            "|---|---|---|---|" + ("---|" if timed else "") + "---|",
        ]
        for r in rows:
            time_cell = f"{r.time_ratio:.2f}x | " if timed else ""
            lines.append(
                f"| {r.mode} | {_mib(r.total)} | {r.ratio:.2f}x smaller | {r.per_sample:,.0f} | "
                f"{time_cell}{r.grad_error:.2e} |"
            )
        lines.append("")
    if training:
        lines += [
            "## Training on scikit-learn's digits",
            "",
            f"CNN (conv-BN-ReLU x4, width {cfg.cnn_width}), Adam lr 3e-3, batch "
            f"{cfg.train_batch}, {cfg.epochs} epochs on {cfg.train_limit or 1437} images, test on "
            f"360; seeds "
            f"{', '.join(map(str, cfg.seeds))} (same initial weights and sample order for "
            "every mode).",
            "",
            "| mode | test accuracy % (per seed) | mean | vs exact | test loss (mean) |",
            "|---|---|---|---|---|",
        ]
        exact = statistics.mean(training[0].accuracy)
        for r in training:
            mean = statistics.mean(r.accuracy)
            lines.append(
                f"| {'exact' if r.bits is None else f'{r.bits}-bit'} | "
                f"{', '.join(f'{a:.2f}' for a in r.accuracy)} | {mean:.2f} | "
                f"{mean - exact:+.2f} | {statistics.mean(r.loss):.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


def run(cfg: Config, with_training: bool = True) -> str:
    """Every measurement; returns the Markdown report."""
    torch.manual_seed(0)
    tables = {}
    gpt = gpt_stack(cfg)
    x = torch.randn(cfg.gpt_batch, cfg.gpt_seq, cfg.gpt_width)
    tables[
        f"GPT-2-style stack: {cfg.gpt_blocks} blocks, width {cfg.gpt_width}, "
        f"{cfg.gpt_batch}x{cfg.gpt_seq} tokens, float32"
    ] = measure_workload("gpt", gpt, x, cfg)
    net = cnn(cfg.cnn_width)
    images = torch.randn(cfg.cnn_batch, 3, cfg.cnn_image, cfg.cnn_image)
    tables[
        f"CNN with BatchNorm and ReLU: width {cfg.cnn_width}, {cfg.cnn_batch} images of "
        f"{cfg.cnn_image}x{cfg.cnn_image}, float32"
    ] = measure_workload("cnn", net, images, cfg)
    training = run_training(cfg) if with_training else []
    return report(cfg, tables, training)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, seconds; no file")
    parser.add_argument("--no-training", action="store_true", help="skip the digits runs")
    parser.add_argument(
        "--time-reps",
        type=int,
        default=None,
        help="time each mode's forward+backward this many times (default: no timing; CPU "
        "timings on a shared machine are noise)",
    )
    parser.add_argument("--out", type=str, default=None, help=f"default: {DEFAULT_OUT}")
    args = parser.parse_args(argv)
    cfg = Config.smoke() if args.smoke else Config()
    if args.time_reps is not None:
        cfg.time_reps = args.time_reps
    text = run(cfg, with_training=not args.no_training)
    print(text)
    out = args.out if args.out is not None else (None if args.smoke else str(DEFAULT_OUT))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
