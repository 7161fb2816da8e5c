"""GPU script: one optimizer window of K micro-batches on a GPT-2-small-sized model.

Providers, on the same initial weights, data and AdamW settings (max_grad_norm 1.0):

- ``native``:               ``(loss / K).backward()`` per micro-batch, then
                            ``clip_grad_norm_``, ``step``, ``zero_grad`` (AdamW's default
                            on CUDA: the foreach implementation);
- ``native.fused``:         the same with ``torch.optim.AdamW(fused=True)``, torch's own
                            fused kernel (the fastest native step);
- ``wrap.step``:            ``fastaccum.wrap(torch.optim.AdamW(...), K)`` + ``opt.step()``;
- ``wrap.backward``:        the same with ``opt.backward(loss)``;
- ``fused.AdamW.backward``: ``fastaccum.optim.AdamW(..., accum_steps=K)`` + ``opt.backward``;
- ``fused.AdamW.backward.wgrad``: the same after ``fastaccum.fuse_wgrad(model)``.

The model is :class:`fastaccum.workloads.ByteGPT` (``nn.Linear`` projections, as GPT code is
usually written), with GPT-2 small's vocabulary, width, depth and context by default.

Per provider: the time per window (CUDA events; median and 20/80 % quantiles over
``--rounds`` windows after a warm-up window), the peak of ``torch.cuda.max_memory_allocated``
during those windows, and the largest relative parameter deviation from ``native`` after the
same number of windows (over all parameters as one vector). Rows go to benchmarks/results/wrapper_gpu.csv.

The default micro-batch (4 x 1024 tokens) makes activations set every provider's peak.
``--micro-batch 1 --seq 128`` (which ``make bench-gpu`` runs too) makes the weights, gradients
and optimizer state set it, where the fused classes' missing step temporaries show: native's
foreach AdamW allocates one parameter-sized set in its step.

``--device cpu --smoke`` runs a tiny configuration on the CPU to check the script itself;
it writes no CSV (absolute times are recorded for GPUs only).
"""

from __future__ import annotations

import argparse
import functools
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
import fastaccum.optim
from fastaccum.workloads import ByteGPT

DEFAULT_CSV = ROOT / "benchmarks" / "results" / "wrapper_gpu.csv"
PROVIDERS = (
    "native",
    "native.fused",
    "wrap.step",
    "wrap.backward",
    "fused.AdamW.backward",
    "fused.AdamW.backward.wgrad",
)
MODELS = {  # name -> ByteGPT(vocab, dim, heads, layers, ctx)
    "gpt2": (50257, 768, 12, 12, 1024),
    "tiny": (256, 64, 4, 2, 32),
}


def build(provider: str, spec: tuple, device: torch.device, k: int):
    """The model (seed 0) and a ``window(batches)`` callable for ``provider``."""
    torch.manual_seed(0)
    model = ByteGPT(*spec).to(device)
    params = list(model.parameters())

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    if provider.startswith("native"):
        opt = torch.optim.AdamW(params, lr=1e-4, fused=provider == "native.fused" or None)

        def window(batches: Sequence[torch.Tensor]) -> None:
            for batch in batches:
                (loss_of(batch) / k).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()

        return model, window
    if provider.endswith(".wgrad"):
        fastaccum.fuse_wgrad(model)  # the parameters stay the same objects
    if provider.startswith("fused.AdamW"):
        wrapped = fastaccum.optim.AdamW(
            params, lr=1e-4, accum_steps=k, max_grad_norm=1.0, model=model
        )
    else:
        wrapped = fastaccum.wrap(torch.optim.AdamW(params, lr=1e-4), k, max_grad_norm=1.0)
    use_backward = ".backward" in provider

    def window(batches: Sequence[torch.Tensor]) -> None:
        for batch in batches:
            if use_backward:
                wrapped.backward(loss_of(batch))
            else:
                loss_of(batch).backward()
            wrapped.step()
            wrapped.zero_grad()

    return model, window


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 3 windows, no CSV")
    parser.add_argument("--model", choices=sorted(MODELS), default="gpt2")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (context)")
    parser.add_argument("--accum-steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10, help="timed windows per provider")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--out", type=str, default=str(DEFAULT_CSV))
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.rounds, args.micro_batch = "tiny", 3, 2
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    error = device_error(device, args.smoke, "gpu_wrapper.py", "`make bench-cpu`")
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    spec = MODELS[args.model]
    k = args.accum_steps
    seq = spec[4] if args.seq is None else args.seq
    if not 1 <= seq <= spec[4]:
        print(f"error: --seq must be in 1..{spec[4]} for {args.model}, got {seq}", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(1)
    data = [
        [
            torch.randint(0, spec[0], (args.micro_batch, seq + 1), generator=gen).to(device)
            for _ in range(k)
        ]
        for _ in range(args.rounds + 1)
    ]
    results, finals = {}, {}
    for provider in args.providers:
        model, window = build(provider, spec, device, k)
        window(data[0])  # warm-up: optimizer state, accumulators
        calls = [functools.partial(window, batches) for batches in data[1:]]
        times, peak = time_calls(calls, device)
        results[provider] = (times, peak)
        # host copies: a provider's weights left on the GPU would count in the next one's peak
        finals[provider] = [
            p.detach().to("cpu", torch.float32, copy=True) for p in model.parameters()
        ]
        del model, window
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"window of K={k} x {args.micro_batch}x{seq} tokens, {args.model}, AdamW, on {name}")
    print(f"{'provider':<28} {'ms/window':>10} {'vs native':>10} {'peak GiB':>9} {'rel dev':>12}")
    base = statistics.median(results["native"][0]) if "native" in results else None
    rows = []
    for provider, (times, peak) in results.items():
        p50 = statistics.median(times)
        dev = float("nan")
        if "native" in finals:
            # over all parameters as one vector: zero-initialized tensors (biases) move by
            # ~lr per step, so per-tensor relative figures there only show Adam's rounding
            diff = sum(
                (a - b).square().sum()
                for a, b in zip(finals[provider], finals["native"], strict=True)
            )
            ref = sum(b.square().sum() for b in finals["native"])
            dev = (diff / ref).sqrt().item()
        speed = f"{base / p50:9.2f}x" if base else "-"
        print(f"{provider:<28} {p50 * 1e3:>10.2f} {speed:>10} {peak / 2**30:>9.2f} {dev:>12.2e}")
        common = {
            "op": f"window_k{k}_{args.model}_b{args.micro_batch}_s{seq}",
            "provider": provider,
            "size": f"{sum(p.numel() for p in finals[provider])} params",
            "dtype": "fp32",
            **environment(device),
        }
        rows += time_and_peak_rows(common, times, peak)
    record_rows(device, args.smoke, args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
