"""GPU script: training-mode BatchNorm (forward + backward) on ResNet-50 activation shapes,
fastaccum's Triton kernels against native PyTorch (cuDNN), without and with a fused ReLU.

Providers, per (shape, dtype, layout, relu):

- ``native``:    ``F.batch_norm(x, None, None, weight, bias, training=True)`` (then
                 ``F.relu``), forward and ``backward``.
- ``fastaccum``: ``batch_norm_stats`` + ``batch_norm_train(..., relu=)`` forward and
                 ``backward`` (four passes over memory: statistics, normalize + affine +
                 ReLU, gradient sums, input gradient; the ReLU mask is recomputed from x).

Before timing, both providers' y, grad_x, grad_weight and grad_bias are compared with a
float64 F.batch_norm on the same inputs; fastaccum must be within twice native's error
(plus a small absolute term), else it is reported and not timed.

Per provider: time per step (CUDA events; median, 20/80 % quantiles over ``--rounds``
steps after warm-up) and the peak ``torch.cuda.max_memory_allocated`` during them. Rows go
to benchmarks/results/batchnorm_gpu.csv. ``--device cpu --smoke`` checks the script on the
CPU (C++ kernels) without writing a CSV.

Usage: python benchmarks/gpu_batchnorm.py [--shapes 32x256x56x56 ...] [--dtypes bf16 fp32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from results_csv import (
    ROOT,
    device_error,
    environment,
    record_rows,
    time_and_peak_rows,
    time_calls,
)

DEFAULT_CSV = ROOT / "benchmarks" / "results" / "batchnorm_gpu.csv"
# ResNet-50 at batch 32: after the stem, and the outputs of stages 1-4.
DEFAULT_SHAPES = ["32x64x112x112", "32x256x56x56", "32x512x28x28", "32x1024x14x14", "32x2048x7x7"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
PROVIDERS = ("native", "fastaccum")
EPS = 1e-5

Step = Callable[[], tuple[torch.Tensor, ...]]


def parse_shape(text: str) -> tuple[int, ...]:
    """``"32x256x56x56"`` -> (32, 256, 56, 56); raises ValueError on anything else."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape must look like 32x256x56x56, got {text!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape needs N and C (and spatial sizes) >= 1, got {text!r}")
    return shape


def make_inputs(shape, dtype, memory_format, device, seed=0):
    """x (requires grad), the incoming gradient, weight and bias (requires grad)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=gen, device=device).to(dtype)
    grad = torch.randn(shape, generator=gen, device=device).to(dtype)
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    grad = grad.contiguous(memory_format=memory_format)
    weight = torch.rand(shape[1], generator=gen, device=device).add_(0.5).requires_grad_()
    bias = torch.randn(shape[1], generator=gen, device=device).requires_grad_()
    return x, grad, weight, bias


def build(provider: str, x, grad, weight, bias, relu: bool) -> Step:
    """One forward + backward; returns (y, grad_x, grad_weight, grad_bias) for checking."""
    import fastaccum.ops as fops

    count = x.numel() // x.shape[1]
    params = (weight, bias)

    def forward() -> torch.Tensor:
        if provider == "native":
            y = F.batch_norm(x, None, None, weight, bias, training=True, eps=EPS)
            return F.relu(y) if relu else y
        mean, m2 = fops.batch_norm_stats(x.detach())
        invstd = torch.rsqrt(m2 / count + EPS)
        return fops.batch_norm_train(x, mean, invstd, weight, bias, relu=relu)

    def step() -> tuple[torch.Tensor, ...]:
        for t in (x, *params):
            t.grad = None
        y = forward()
        y.backward(grad)
        return y, x.grad, weight.grad, bias.grad

    return step


def float64_truth(x, grad, weight, bias, relu):
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y = F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True, eps=EPS)
    if relu:
        y = F.relu(y)
    y.backward(grad.double())
    return y, *(t.grad for t in leaves)


def relative_errors(got, want) -> list[float]:
    return [
        (g.double() - w).norm().item() / max(w.norm().item(), 1e-30)
        for g, w in zip(got, want, strict=True)
    ]


def check(steps: dict[str, Step], x, grad, weight, bias, relu) -> str | None:
    """None when fastaccum's errors against float64 are within 2x native's + atol."""
    want = float64_truth(x, grad, weight, bias, relu)
    errors = {name: relative_errors(step(), want) for name, step in steps.items()}
    atol = 1e-5 if x.dtype == torch.float32 else 2 * torch.finfo(x.dtype).eps
    names = ("y", "grad_x", "grad_weight", "grad_bias")
    for name, mine, theirs in zip(names, errors["fastaccum"], errors["native"], strict=True):
        if not mine <= 2 * theirs + atol:
            return f"{name}: fastaccum error {mine:.2e} > 2 x native's {theirs:.2e} + {atol:.0e}"
    return None


def measure(step: Step, device: torch.device, rounds: int) -> tuple[list[float], int]:
    """Seconds per step over ``rounds`` calls after two warm-up calls, and the peak bytes."""
    step()
    step()
    return time_calls([step] * rounds, device)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny run, no CSV")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="NxCxHxW ...")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=sorted(LAYOUTS))
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--out", type=str, default=str(DEFAULT_CSV))
    args = parser.parse_args(argv)
    try:
        shapes = [parse_shape(s) for s in args.shapes]
    except ValueError as exc:
        parser.error(str(exc))
    if args.rounds < 5:
        parser.error(f"--rounds must be >= 5, got {args.rounds}")
    if args.smoke:
        shapes, args.rounds = [(2, 8, 5, 7)], 5
    device = torch.device(args.device)
    error = device_error(device, args.smoke, "gpu_batchnorm.py", "benchmarks/test_batchnorm_cpu.py")
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows, failures = [], []
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"training-mode BatchNorm forward + backward on {name}, torch {torch.__version__}")
    print(f"{'shape':<16} {'dtype':<5} {'layout':<14} {'relu':<5} {'native ms':>10} "
          f"{'fastaccum ms':>13} {'speed-up':>9} {'peak MiB n/f':>16}")  # fmt: skip
    for shape in shapes:
        for dtype_name in args.dtypes:
            for layout in args.layouts:
                for relu in (False, True):
                    inputs = make_inputs(shape, DTYPES[dtype_name], LAYOUTS[layout], device)
                    steps = {p: build(p, *inputs, relu) for p in PROVIDERS}
                    size = "x".join(map(str, shape)) + f" {layout}"
                    problem = check(steps, *inputs, relu)
                    if problem is not None:
                        failures.append(f"{size} {dtype_name} relu={relu}: {problem}")
                        print(f"error: {failures[-1]}; not timed", file=sys.stderr)
                        continue
                    results = {p: measure(s, device, args.rounds) for p, s in steps.items()}
                    common = {
                        "op": "bn_train_step" + ("_relu" if relu else ""),
                        "size": size,
                        "dtype": dtype_name,
                        **environment(device),
                    }
                    for provider, (times, peak) in results.items():
                        rows += time_and_peak_rows({**common, "provider": provider}, times, peak)
                    t_n, t_f = (statistics.median(results[p][0]) for p in PROVIDERS)
                    peaks = "/".join(f"{results[p][1] / 2**20:.0f}" for p in PROVIDERS)
                    print(f"{'x'.join(map(str, shape)):<16} {dtype_name:<5} {layout:<14} "
                          f"{relu!s:<5} {t_n * 1e3:>10.3f} {t_f * 1e3:>13.3f} "
                          f"{t_n / t_f:>8.2f}x {peaks:>16}")  # fmt: skip
                    del inputs, steps, results
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    record_rows(device, args.smoke, args.out, rows)
    if failures:
        print(f"error: {len(failures)} configuration(s) gave wrong results", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
