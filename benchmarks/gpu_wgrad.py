"""GPU script: one micro-step (forward + backward + accumulation) on GPT-2-small-shaped
blocks, with fused weight gradients against the unfused wrapper and native PyTorch.

Providers (bf16 autocast, fp32 parameters, fp32 accumulation):

- ``native``:        ``loss.backward()``; autograd makes each dW and adds it into ``.grad``;
- ``wrap.unfused``:  ``fastaccum.wrap`` + ``opt.backward``: dW made, folded by accumulate_;
- ``wrap.fused``:    the same after ``fastaccum.fuse_wgrad``: the weight-gradient GEMM adds
                     into the fp32 accumulator, no dW.

Per provider: time per micro-step (CUDA events; median, 20/80 % quantiles over ``--rounds``
micro-steps after warm-up) and the peak ``torch.cuda.max_memory_allocated`` during them,
with the Linear weight-gradient bytes for scale. Rows go to
benchmarks/results/wgrad_gpu.csv. ``--device cpu --smoke`` checks the script on the CPU
without writing a CSV.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from collections.abc import Sequence

import torch
from results_csv import (
    ROOT,
    device_error,
    environment,
    record_rows,
    time_and_peak_rows,
    time_calls,
)

import fastaccum
from fastaccum.workloads import GPT2Blocks

DEFAULT_CSV = ROOT / "benchmarks" / "results" / "wgrad_gpu.csv"
PROVIDERS = ("native", "wrap.unfused", "wrap.fused")


def build(provider: str, blocks: int, device: torch.device, x: torch.Tensor):
    """The model and a ``micro_step()`` callable for ``provider``."""
    torch.manual_seed(0)
    model = GPT2Blocks(blocks=blocks).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def loss() -> torch.Tensor:
        with autocast:
            return model(x).float().square().mean()

    if provider == "native":
        return model, lambda: loss().backward()
    if provider == "wrap.fused":
        fastaccum.fuse_wgrad(model)
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.0), 10**6, model=model)

    def micro_step() -> None:
        opt.backward(loss())
        opt.step()

    return model, micro_step


def measure(micro_step, device: torch.device, rounds: int) -> tuple[list[float], int]:
    """Seconds per micro-step over ``rounds`` calls after two warm-up calls, and the peak
    bytes allocated during them."""
    micro_step()
    micro_step()
    return time_calls([micro_step] * rounds, device)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny run, no CSV")
    parser.add_argument("--blocks", type=int, default=12, help="GPT-2-small blocks (12)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=str, default=str(DEFAULT_CSV))
    args = parser.parse_args(argv)
    if args.smoke:
        args.blocks, args.micro_batch, args.seq, args.rounds = 1, 1, 16, 3
    device = torch.device(args.device)
    error = device_error(device, args.smoke, "gpu_wgrad.py", "`make bench-cpu`")
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    x = torch.randn(args.micro_batch, args.seq, 768, device=device)
    results = {}
    for provider in PROVIDERS:
        model, micro_step = build(provider, args.blocks, device, x)
        wgrad_bytes = sum(
            m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear)
        )
        results[provider] = measure(micro_step, device, args.rounds)
        del model, micro_step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"micro-step: {args.blocks} GPT-2 blocks, {args.micro_batch}x{args.seq} tokens, bf16 "
        f"autocast, on {name}; Linear weight gradients = {wgrad_bytes / 2**30:.2f} GiB"
    )
    print(f"{'provider':<14} {'ms':>9} {'time/native':>11} {'peak GiB':>9} {'peak - native':>14}")
    base_t = statistics.median(results["native"][0])
    base_m = results["native"][1]
    rows = []
    common = {
        "op": f"wgrad_microstep_gpt2x{args.blocks}_b{args.micro_batch}_s{args.seq}",
        "size": f"{wgrad_bytes} wgrad bytes",
        "dtype": "bf16-autocast",
        **environment(device),
    }
    for provider, (times, peak) in results.items():
        p50 = statistics.median(times)
        print(
            f"{provider:<14} {p50 * 1e3:>9.2f} {p50 / base_t:>10.2f}x {peak / 2**30:>9.2f} "
            f"{(peak - base_m) / 2**30:>+13.2f}G"
        )
        rows += time_and_peak_rows({**common, "provider": provider}, times, peak)
    record_rows(device, args.smoke, args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
