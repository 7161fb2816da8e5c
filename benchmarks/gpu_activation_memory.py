"""GPU script: peak memory and time of one forward+backward of GPT-2-small-shaped blocks
under fastaccum's activation policy, against no policy, torch.utils.checkpoint and
torch.autograd.graph.save_on_cpu.

Providers (bf16 autocast by default, fp32 parameters):

- ``none``:                   plain PyTorch;
- ``torch.checkpoint``:       ``torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)``
                              per block;
- ``torch.save_on_cpu``:      ``torch.autograd.graph.save_on_cpu(pin_memory=True)``;
- ``fastaccum.{8,4,2}bit``:   ``fastaccum.save_activations(ActivationPolicy(bits=...))``;
- ``fastaccum.checkpoint``:   ``fastaccum.checkpoint`` per block (masks only, lossless);
- ``fastaccum.checkpoint+8bit``: the same inside an 8-bit policy;
- ``fastaccum.offload``:      ``ActivationPolicy(bits=None, offload=True)``;
- ``fastaccum.offload+8bit``: 8-bit codes offloaded to pinned host memory.

Per provider: time per step (CUDA events; median, 20/80 % quantiles over ``--rounds`` steps
after warm-up), the peak ``torch.cuda.max_memory_allocated`` during them, and the bytes
counted by ``fastaccum.memory.saved_bytes`` (not for ``torch.save_on_cpu``, whose hooks the
counter's would replace). Rows go to
benchmarks/results/activation_memory_gpu.csv; the table printed quotes each provider's time
and peak relative to ``none`` (the issue's bar: 8-bit overhead at most 15 %).
``--device cpu --smoke`` checks the script on the CPU without writing a CSV.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable, Sequence

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
from fastaccum.memory import ActivationPolicy, saved_bytes
from fastaccum.workloads import GPT2Blocks

DEFAULT_CSV = ROOT / "benchmarks" / "results" / "activation_memory_gpu.csv"
PROVIDERS = (
    "none",
    "torch.checkpoint",
    "torch.save_on_cpu",
    "fastaccum.8bit",
    "fastaccum.4bit",
    "fastaccum.2bit",
    "fastaccum.checkpoint",
    "fastaccum.checkpoint+8bit",
    "fastaccum.offload",
    "fastaccum.offload+8bit",
)


class Stack(torch.nn.Module):
    """``blocks`` single GPT-2 blocks; ``run_block`` decides how each block is called."""

    def __init__(self, blocks: int, dim: int, heads: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            GPT2Blocks(blocks=1, dim=dim, heads=heads, ff=4 * dim) for _ in range(blocks)
        )
        self.run_block: Callable = lambda block, h: block(h)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = self.run_block(block, h)
        return h


def configure(provider: str, model: Stack) -> Callable[[], contextlib.AbstractContextManager]:
    """Set how ``model`` runs its blocks for ``provider``; returns the context that wraps
    the forward pass."""
    model.run_block = lambda block, h: block(h)
    if provider == "torch.checkpoint":
        from torch.utils.checkpoint import checkpoint

        model.run_block = lambda block, h: checkpoint(block, h, use_reentrant=False)
    if provider.startswith("fastaccum.checkpoint"):
        model.run_block = lambda block, h: fastaccum.checkpoint(block, h)
    if provider == "torch.save_on_cpu":
        return lambda: torch.autograd.graph.save_on_cpu(pin_memory=True)
    policy = policy_for(provider)
    if policy is None:
        return contextlib.nullcontext
    return lambda: fastaccum.save_activations(policy)


def policy_for(provider: str) -> ActivationPolicy | None:
    """The activation policy of a fastaccum provider (None for the others)."""
    if not provider.startswith("fastaccum."):
        return None
    bits = None
    for b in (8, 4, 2):
        if f"{b}bit" in provider:
            bits = b
    return ActivationPolicy(bits=bits, offload="offload" in provider)


def build_step(provider: str, model: Stack, x: torch.Tensor, dtype: str) -> Callable[[], None]:
    """One forward+backward of ``model`` on ``x`` under ``provider``."""
    context = configure(provider, model)
    device_type = x.device.type
    autocast = (
        torch.autocast(device_type, dtype=torch.bfloat16)
        if dtype == "bf16"
        else contextlib.nullcontext()
    )

    def step() -> None:
        with autocast, context():
            loss = model(x).float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny run, no CSV")
    parser.add_argument("--blocks", type=int, default=12, help="GPT-2-small blocks (12)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--providers", nargs="*", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--out", type=str, default=str(DEFAULT_CSV))
    args = parser.parse_args(argv)
    if args.smoke:
        args.blocks, args.dim, args.heads, args.micro_batch, args.seq, args.rounds = (
            2,
            64,
            2,
            2,
            32,
            3,
        )
    device = torch.device(args.device)
    error = device_error(
        device, args.smoke, "gpu_activation_memory.py", "benchmarks/activation_memory.py"
    )
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if "none" not in args.providers:
        args.providers.insert(0, "none")
    torch.manual_seed(0)
    model = Stack(args.blocks, args.dim, args.heads).to(device)
    x = torch.randn(args.micro_batch, args.seq, args.dim, device=device)
    results = {}
    for provider in args.providers:
        step = build_step(provider, model, x, args.dtype)
        step()
        step()  # warm-up: kernels compiled, pinned pool filled
        times, peak = time_calls([step] * args.rounds, device)
        counted = None
        if provider != "torch.save_on_cpu":  # its hooks would be replaced by the counter's
            bf16 = args.dtype == "bf16"
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                counted = saved_bytes(model, x, policy_for(provider)).total
        results[provider] = (times, peak, counted)
        model.run_block = lambda block, h: block(h)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"forward+backward: {args.blocks} GPT-2 blocks (width {args.dim}), "
        f"{args.micro_batch}x{args.seq} tokens, {args.dtype}, on {name}"
    )
    print(
        f"{'provider':<26} {'ms':>9} {'time/none':>9} {'peak GiB':>9} {'peak/none':>9} "
        f"{'counted GiB':>11}"
    )
    base_t = statistics.median(results["none"][0])
    base_m = max(results["none"][1], 1)
    common = {
        "op": f"activations_gpt2x{args.blocks}_b{args.micro_batch}_s{args.seq}",
        "size": f"{args.micro_batch * args.seq} tokens",
        "dtype": args.dtype,
        **environment(device),
    }
    rows = []
    for provider, (times, peak, counted) in results.items():
        p50 = statistics.median(times)
        print(
            f"{provider:<26} {p50 * 1e3:>9.2f} {p50 / base_t:>8.2f}x {peak / 2**30:>9.2f} "
            f"{peak / base_m:>8.2f}x "
            + ("n/a".rjust(11) if counted is None else f"{counted / 2**30:>11.3f}")
        )
        rows += time_and_peak_rows({**common, "provider": provider}, times, peak)
        if counted is None:
            continue
        rows.append(
            {
                **common,
                "provider": provider,
                "metric": "saved_bytes_counted",
                "unit": "bytes",
                "p50": str(counted),
                "p20": "",
                "p80": "",
            }
        )
    record_rows(device, args.smoke, args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
