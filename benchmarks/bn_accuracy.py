"""BatchNorm at micro-batch 2 under accumulation: test accuracy on a real dataset.

Dataset: scikit-learn's ``load_digits`` (1797 8x8 grey-scale digits, shipped inside the
package, so nothing is downloaded). A fixed stratified split (same for every seed) gives the
train and test sets; pixels are scaled to [0, 1].

Model: a small CNN with BatchNorm after each of three convolutions and after the hidden
fully connected layer (BatchNorm1d, where a micro-batch of 2 gives each channel 2 values).

Runs, per seed (same initial weights and same sample order for every run of a seed):

- ``bn-32``: true batch 32, ``nn.BatchNorm``;
- ``bn-2x16``: micro-batch 2 accumulated over 16 micro-batches with the native loop
  (``(loss / 16).backward()``, step every 16), ``nn.BatchNorm``;
- ``<mode>-2x16``: the same micro-batches with ``fastaccum.convert_batchnorm(model, mode)``
  and ``fastaccum.wrap(opt, 16, model=model)``, which closes the BatchNorm window at each
  step;
- ``gn-2x16``: micro-batch 2 accumulated to 32 with GroupNorm instead of BatchNorm.

Every run makes the same number of optimizer steps (SGD with momentum, cosine learning
rate); test accuracy is measured once, in eval mode, after the last epoch.

Run: ``python benchmarks/bn_accuracy.py`` (writes benchmarks/results/bn_accuracy.md);
``--help`` lists the settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path

import torch
from tqdm import tqdm

import fastaccum

RESULTS = Path(__file__).parent / "results" / "bn_accuracy.md"


@dataclasses.dataclass
class Config:
    """Experiment settings; the defaults are those of the recorded table."""

    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 20
    batch: int = 32  # effective batch (one optimizer step)
    micro: int = 2  # micro-batch of the accumulated runs
    train_size: int = 1024  # a multiple of ``batch``: every window is full
    width: int = 16  # channels of the first convolution
    fc_norm: bool = True  # normalize the hidden fully connected layer too
    lr: float = 0.05
    weight_decay: float = 5e-4
    runs: tuple[str, ...] = (
        "bn-32",
        "bn-2x16",
        "merged-2x16",
        "renorm-2x16",
        "window-2x16",
        "gn-2x16",
    )
    renorm: dict[str, float | int] = dataclasses.field(default_factory=dict)
    threads: int = 1


def load_digits_split(train_size: int) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): a fixed stratified split of ``load_digits``,
    images as float32 (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, train_size=train_size, stratify=digits.target, random_state=0
    )

    def images(a: object) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float32).unsqueeze(1) / 16.0

    return (
        images(x_train),
        torch.tensor(y_train),
        images(x_test),
        torch.tensor(y_test),
    )


def build_cnn(norm: str, width: int, seed: int, fc_norm: bool = True) -> torch.nn.Sequential:
    """Conv-norm-ReLU x3 (two 2x2 max-pools), then FC-norm-ReLU and a 10-way head.

    ``norm="bn"`` uses BatchNorm2d/1d; ``norm="gn"`` GroupNorm with 8 groups in the same
    places. ``fc_norm=False`` leaves the hidden FC layer unnormalized. The seed fixes the
    initial weights, which are the same for both norms.
    """
    torch.manual_seed(seed)
    c1, c2, c3, hidden = width, 2 * width, 4 * width, 8 * width

    def norm_layer(channels: int, dims: int) -> torch.nn.Module:
        if dims == 1 and not fc_norm:
            return torch.nn.Identity()
        if norm == "gn":
            return torch.nn.GroupNorm(8, channels)
        return torch.nn.BatchNorm2d(channels) if dims == 2 else torch.nn.BatchNorm1d(channels)

    return torch.nn.Sequential(
        torch.nn.Conv2d(1, c1, 3, padding=1),
        norm_layer(c1, 2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(c1, c2, 3, padding=1),
        norm_layer(c2, 2),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(c2, c3, 3, padding=1),
        norm_layer(c3, 2),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(c3 * 4, hidden),
        norm_layer(hidden, 1),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )


def train_and_test(run: str, seed: int, cfg: Config, data: tuple[torch.Tensor, ...]) -> float:
    """Train one run for ``cfg.epochs`` epochs; return its test accuracy in percent."""
    x_train, y_train, x_test, y_test = data
    kind, shape = run.rsplit("-", 1)
    micro = cfg.batch if shape == str(cfg.batch) else cfg.micro
    accum = cfg.batch // micro
    model = build_cnn("gn" if kind == "gn" else "bn", cfg.width, seed, cfg.fc_norm)
    if kind not in ("bn", "gn"):
        options = cfg.renorm if kind == "renorm" else {}
        fastaccum.convert_batchnorm(model, mode=kind, **options)
    sgd = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay
    )
    steps = cfg.epochs * (len(x_train) // cfg.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=steps)
    wrapped = kind not in ("bn", "gn")
    opt = fastaccum.wrap(sgd, accum, model=model) if wrapped else sgd
    order = torch.Generator().manual_seed(1000 + seed)  # the same sample order in every run
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x_train), generator=order)
        for start in range(0, len(perm) - cfg.batch + 1, cfg.batch):
            window = perm[start : start + cfg.batch]
            for i in range(0, cfg.batch, micro):
                idx = window[i : i + micro]
                loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                if wrapped:
                    loss.backward()
                    if opt.step():
                        sched.step()
                    opt.zero_grad()
                else:
                    (loss / accum).backward()
            if not wrapped:
                opt.step()
                opt.zero_grad()
                sched.step()
    model.eval()
    with torch.no_grad():
        correct = (model(x_test).argmax(1) == y_test).sum().item()
    return 100.0 * correct / len(y_test)


def run_experiment(cfg: Config, progress: bool = True) -> dict[str, list[float]]:
    """Test accuracy (percent) per run, one entry per seed in ``cfg.seeds`` order."""
    if cfg.train_size % cfg.batch or cfg.batch % cfg.micro:
        raise ValueError(
            f"train_size ({cfg.train_size}) must be a multiple of batch ({cfg.batch}), and "
            f"batch a multiple of micro ({cfg.micro})"
        )
    torch.set_num_threads(cfg.threads)
    data = load_digits_split(cfg.train_size)
    results: dict[str, list[float]] = {run: [] for run in cfg.runs}
    jobs = [(seed, run) for seed in cfg.seeds for run in cfg.runs]
    for seed, run in tqdm(jobs, desc="bn_accuracy", disable=not progress):
        results[run].append(train_and_test(run, seed, cfg, data))
    return results


RUN_LABELS = {
    "bn": "BatchNorm, true batch {batch}",
    "bn-micro": "BatchNorm, micro-batch {micro} x {accum} (native loop)",
    "merged": "fastaccum `merged`, micro-batch {micro} x {accum}",
    "renorm": "fastaccum `renorm`, micro-batch {micro} x {accum}",
    "window": "fastaccum `window`, micro-batch {micro} x {accum}",
    "gn": "GroupNorm, micro-batch {micro} x {accum}",
}


def describe(run: str, cfg: Config) -> str:
    kind, shape = run.rsplit("-", 1)
    if kind == "bn" and shape != str(cfg.batch):
        kind = "bn-micro"
    label = RUN_LABELS.get(kind, f"`{kind}`, micro-batch {{micro}} x {{accum}}")
    return label.format(batch=cfg.batch, micro=cfg.micro, accum=cfg.batch // cfg.micro)


def format_table(results: dict[str, list[float]], cfg: Config) -> str:
    """The Markdown report: setup, machine, and a row per run (mean and per seed)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    reference = statistics.fmean(results["bn-32"]) if "bn-32" in results else math.nan
    seeds = ", ".join(str(s) for s in cfg.seeds)
    lines = [
        "# BatchNorm at micro-batch 2: test accuracy on scikit-learn digits",
        "",
        f"Produced by `python benchmarks/bn_accuracy.py` ({_settings(cfg)}).",
        "",
        f"Machine: {_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
        f"thread(s); torch {torch.__version__}; commit {commit}; "
        f"{datetime.date.today().isoformat()}.",
        "",
        f"Test accuracy (%) on {1797 - cfg.train_size} held-out digits after {cfg.epochs} "
        f"epochs on {cfg.train_size}; seeds {seeds}.",
        "",
        "| run | mean | vs true batch | " + " | ".join(f"seed {s}" for s in cfg.seeds) + " |",
        "|---|---|---|" + "---|" * len(cfg.seeds),
    ]
    for run, accs in results.items():
        mean = statistics.fmean(accs)
        lines.append(
            f"| {describe(run, cfg)} | {mean:.2f} | {mean - reference:+.2f} | "
            + " | ".join(f"{a:.2f}" for a in accs)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _settings(cfg: Config) -> str:
    parts = [
        f"epochs={cfg.epochs}",
        f"batch={cfg.batch}",
        f"micro={cfg.micro}",
        f"train_size={cfg.train_size}",
        f"width={cfg.width}",
        f"lr={cfg.lr}",
        f"weight_decay={cfg.weight_decay}",
    ]
    if not cfg.fc_norm:
        parts.append("no norm on the hidden FC layer")
    if cfg.renorm:
        parts.append("renorm " + ", ".join(f"{k}={v}" for k, v in cfg.renorm.items()))
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds))
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--train-size", type=int, default=defaults.train_size)
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--runs", nargs="+", default=list(defaults.runs))
    parser.add_argument(
        "--no-fc-norm", action="store_true", help="no norm layer on the hidden FC layer"
    )
    parser.add_argument("--threads", type=int, default=defaults.threads)
    for name in fastaccum.nn.batchnorm.RENORM_OPTIONS:
        kind = float if name in ("rmax", "dmax") else int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS, help="Markdown file to write")
    args = parser.parse_args(argv)
    renorm = {
        name: getattr(args, name)
        for name in fastaccum.nn.batchnorm.RENORM_OPTIONS
        if getattr(args, name) is not None
    }
    cfg = Config(
        seeds=tuple(args.seeds),
        epochs=args.epochs,
        train_size=args.train_size,
        width=args.width,
        lr=args.lr,
        runs=tuple(args.runs),
        fc_norm=not args.no_fc_norm,
        renorm=renorm,
        threads=args.threads,
    )
    table = format_table(run_experiment(cfg), cfg)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
