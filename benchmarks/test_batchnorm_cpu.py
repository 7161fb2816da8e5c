"""CPU suite: training-mode BatchNorm forward + backward on a ResNet-stage-sized activation
(8, 64, 56, 56), fastaccum against native PyTorch, in the same run:

- ``native``:    ``F.batch_norm(x, None, None, weight, bias, training=True)`` (then
                 ``F.relu`` in the ReLU groups), forward and ``backward``.
- ``fastaccum``: ``batch_norm_stats`` (one read of x), ``invstd``, then
                 ``batch_norm_train(..., relu=)``: apply (read x, write y) and, in the
                 backward, the gradient sums (read dy and x) and the input gradient (read
                 dy and x, write dx). The ReLU is fused; its mask is recomputed from x.

A second suite times the modules: ``nn.BatchNorm2d`` (``native``) against
``fastaccum.nn.AccumBatchNorm2d`` in each mode (``merged``, ``renorm``, ``window``), one
training micro-batch forward + backward after a completed window; ``--modules`` runs it
round-robin and also prints each module's peak tensor memory over native's
(:class:`fastaccum.memory.peak.LiveTensorBytes`).

Groups: fp32 NCHW, fp32 channels-last, bf16 NCHW, bf16 channels-last; each without and
with ReLU (the ops suite). ``extra_info["bytes"]`` is what fastaccum's four passes must move (fp32: 32 B
per element, bf16: 16 B), for the GB/s column of the summary.

pytest-benchmark times one provider after the other. On a shared machine whose speed
drifts, run this file as a script instead: it calls the providers round-robin and prints
each group's median ratio::

    python benchmarks/test_batchnorm_cpu.py [--rounds 30] [--groups fp32-nchw ...]
        [--threads N] [--clock wall|cpu] [--modules]

``--clock cpu`` times with the process's CPU time (``time.process_time``, user + system of
all its threads) instead of the wall clock: on a machine shared with other jobs, time the
process spends descheduled then does not count. With more than one thread it also counts
the time OpenMP workers spin while they wait, so use it with ``--threads 1``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F

import fastaccum.ops as fops
from fastaccum.memory.peak import peak_bytes
from fastaccum.nn import AccumBatchNorm2d, end_window

SHAPE = (8, 64, 56, 56)
EPS = 1e-5
GROUPS = {
    "fp32-nchw": (torch.float32, torch.contiguous_format),
    "fp32-channels_last": (torch.float32, torch.channels_last),
    "bf16-nchw": (torch.bfloat16, torch.contiguous_format),
    "bf16-channels_last": (torch.bfloat16, torch.channels_last),
}
PROVIDERS = ("native", "fastaccum")
MODULE_PROVIDERS = ("native", "merged", "renorm", "window")


def _setup(provider: str, group: str, relu: bool) -> Callable[[], None]:
    """One training step of the layer (forward + backward) as a zero-argument callable."""
    dtype, memory_format = GROUPS[group]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen).to(dtype).contiguous(memory_format=memory_format)
    grad = torch.randn(SHAPE, generator=gen).to(dtype).contiguous(memory_format=memory_format)
    x.requires_grad_()
    # Parameters in the activations' dtype, as a model cast with .to(dtype) has them.
    weight = torch.rand(SHAPE[1], generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(SHAPE[1], generator=gen).to(dtype).requires_grad_()
    count = x.numel() // SHAPE[1]

    def release_grads() -> None:
        # As in a network, where x's gradient flows on instead of being added into .grad.
        for t in (x, weight, bias):
            t.grad = None

    if provider == "native":

        def step() -> None:
            release_grads()
            y = F.batch_norm(x, None, None, weight, bias, training=True, eps=EPS)
            if relu:
                y = F.relu(y)
            y.backward(grad)

    else:

        def step() -> None:
            release_grads()
            mean, m2 = fops.batch_norm_stats(x.detach())
            invstd = torch.rsqrt(m2 / count + EPS)
            y = fops.batch_norm_train(x, mean, invstd, weight, bias, relu=relu)
            y.backward(grad)

    return step


def _module_setup(provider: str, group: str) -> Callable[[], None]:
    """One training micro-batch of a BatchNorm module (forward + backward): ``nn.BatchNorm2d``
    for ``native``, else ``AccumBatchNorm2d`` in that mode, after one completed window (so
    that ``renorm`` and ``window`` normalize against a reference)."""
    dtype, memory_format = GROUPS[group]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen).to(dtype).contiguous(memory_format=memory_format)
    grad = torch.randn(SHAPE, generator=gen).to(dtype).contiguous(memory_format=memory_format)
    x.requires_grad_()
    if provider == "native":
        layer = torch.nn.BatchNorm2d(SHAPE[1], eps=EPS)
    else:  # renorm with its limits open from the first window on
        options = {"plain_windows": 0, "warmup_windows": 1} if provider == "renorm" else {}
        layer = AccumBatchNorm2d(SHAPE[1], eps=EPS, mode=provider, **options)
    layer.to(dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=gen)
        layer.bias.normal_(generator=gen)
    if provider != "native":
        layer(x.detach()).sum().backward()
        end_window(layer)

    def step() -> None:
        x.grad = None
        layer.zero_grad()
        layer(x).backward(grad)

    return step


@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("provider", MODULE_PROVIDERS)
def test_module_train_step(benchmark, provider, group):
    step = _module_setup(provider, group)
    benchmark.group = f"{group} module fwd+bwd"
    benchmark.extra_info.update(provider=provider)
    benchmark.pedantic(step, rounds=15, warmup_rounds=2)


def bytes_moved(group: str) -> int:
    """Bytes fastaccum's four passes read and write: x four times, dy twice, y and dx once."""
    dtype, _ = GROUPS[group]
    numel = 1
    for n in SHAPE:
        numel *= n
    return 8 * numel * torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn+relu"])
@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, provider, group, relu):
    step = _setup(provider, group, relu)
    benchmark.group = f"{group} {'bn+relu' if relu else 'bn'} fwd+bwd"
    benchmark.extra_info.update(provider=provider, bytes=bytes_moved(group))
    benchmark.pedantic(step, rounds=15, warmup_rounds=2)


# --------------------------------------------------------------------------- interleaved


def round_robin(
    steps: dict[str, Callable[[], None]], rounds: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Call the steps round-robin ``rounds`` times (order rotated each round), after one
    warm-up call each; return each one's times by ``clock``."""
    for step in steps.values():
        step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = clock()
            steps[name]()
            times[name].append(clock() - start)
    return times


def interleaved(
    groups: Sequence[str], rounds: int, clock: Callable[[], float] = time.perf_counter
) -> list[tuple[str, float, float, float]]:
    """Per (group, relu): the ops' providers round-robin (:func:`round_robin`). Returns
    (name, median native / median fastaccum, same for the minima, the fastaccum time's
    interquartile range over its median)."""
    rows = []
    for group in groups:
        for relu in (False, True):
            times = round_robin({p: _setup(p, group, relu) for p in PROVIDERS}, rounds, clock)
            native, fused = times["native"], times["fastaccum"]
            q = statistics.quantiles(fused, n=4)
            rows.append(
                (
                    f"{group} {'bn+relu' if relu else 'bn'}",
                    statistics.median(native) / statistics.median(fused),
                    min(native) / min(fused),
                    (q[2] - q[0]) / statistics.median(fused),
                )
            )
    return rows


def interleaved_modules(
    groups: Sequence[str], rounds: int, clock: Callable[[], float] = time.perf_counter
) -> list[tuple[str, str, float, float]]:
    """Per group and mode: (group, mode, median time over native's, peak tensor bytes over
    native's), the modules timed round-robin (:func:`round_robin`)."""
    rows = []
    for group in groups:
        steps = {p: _module_setup(p, group) for p in MODULE_PROVIDERS}
        times = round_robin(steps, rounds, clock)
        peaks = {p: peak_bytes(step, "cpu")[0] for p, step in steps.items()}
        base = statistics.median(times["native"])
        for p in MODULE_PROVIDERS[1:]:
            rows.append((group, p, statistics.median(times[p]) / base, peaks[p] / peaks["native"]))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="calls per provider and group")
    parser.add_argument("--groups", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument(
        "--modules", action="store_true", help="time the BatchNorm modules instead of the ops"
    )
    args = parser.parse_args(argv)
    if args.rounds < 4:
        parser.error(f"--rounds must be >= 4, got {args.rounds}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    print(
        f"shape {SHAPE}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.clock} clock"
    )
    if args.modules:
        print(f"{'group':<20} {'mode':<8} {'time / native':>14} {'peak / native':>14}")
        for group, mode, ratio, peak in interleaved_modules(args.groups, args.rounds, clock):
            print(f"{group:<20} {mode:<8} {ratio:>13.2f}x {peak:>13.2f}x")
        return 0
    print(f"{'group':<28} {'speed-up (median)':>18} {'(min)':>8} {'fastaccum IQR':>14}")
    for name, med, best, iqr in interleaved(args.groups, args.rounds, clock):
        print(f"{name:<28} {med:>17.2f}x {best:>7.2f}x {iqr:>13.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
