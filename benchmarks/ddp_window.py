"""Time per window of DDP (or FSDP2) gradient accumulation on 2 CPU processes (gloo), as ratios.

Providers, each on its own DDP copy of the same MLP, accumulating K micro-batches per
optimizer step (AdamW):

- ``ddp.every_step``: the native loop without ``no_sync``: ``(loss / K).backward()`` on
  every micro-batch, so DDP all-reduces every micro-batch;
- ``ddp.no_sync``: the native loop with ``no_sync()`` around the forward and backward of
  the first K-1 micro-batches: one all-reduce per window;
- ``fastaccum``: ``fastaccum.wrap(opt, K, model=ddp)``, ``opt.backward(loss, num_items=n)``
  and ``opt.step()``: sync flag set by the wrapper, one all-reduce per bucket per window
  from the comm hook (overlapped with the last backward), fp32 accumulators;
- ``fastaccum.step``: the same with ``loss.backward(); opt.step(num_items=n)``, whose
  reduction runs at ``step()`` after backward;
- ``fastaccum.fused``: ``fastaccum.fuse_wgrad(model)`` and ``fastaccum.optim.AdamW`` with
  ``opt.backward``: weight gradients go straight into the accumulators, fused update.

With ``--fsdp`` the same MLP is sharded with ``fully_shard`` (each Linear, then the whole)
and the providers are:

- ``fsdp.every_step``: the native loop with gradient sync on: ``(loss / K).backward()``
  reduce-scatters every micro-batch;
- ``fsdp.no_sync``: the native loop with ``set_requires_gradient_sync(False)`` for the
  first K-1 micro-batches: FSDP2 keeps unsharded gradients and reduce-scatters once;
- ``fastaccum``: ``fastaccum.wrap(torch.optim.AdamW(...), K, model=fsdp_model)`` with
  ``opt.backward``: one reduce-scatter per window, torch's AdamW on the DTensors;
- ``fastaccum.fused``: ``fastaccum.fuse_wgrad(model)`` before sharding and
  ``fastaccum.optim.AdamW(..., model=fsdp_model)``: the weight gradients go straight into
  the window gradient FSDP2 keeps unsharded, and the update is one fused pass over the
  local shards.

The providers run round-robin (one window each per round, the order rotated every round)
so that the load drift of a shared machine hits all alike. Each window is timed on rank 0
between two barriers. The report gives, per provider, the median over rounds of its time
divided by ``ddp.no_sync``'s time in the same round (and the 20th/80th percentiles), and
the same against ``ddp.every_step``. No absolute times are printed.

Run: python benchmarks/ddp_window.py [--fsdp] [--rounds 20] [--accum-steps 8] [--width 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import fastaccum

PROVIDERS = ["ddp.every_step", "ddp.no_sync", "fastaccum", "fastaccum.step", "fastaccum.fused"]
FSDP_PROVIDERS = ["fsdp.every_step", "fsdp.no_sync", "fastaccum", "fastaccum.fused"]


def providers(fsdp: bool) -> list[str]:
    return FSDP_PROVIDERS if fsdp else PROVIDERS


def make_model(width: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(4):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))


def micro_batches(rank: int, k: int, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """K micro-batches of 4 to 16 samples (uneven: the item counts differ)."""
    gen = torch.Generator().manual_seed(rank)
    sizes = torch.randint(4, 17, (k,), generator=gen).tolist()
    return [(torch.randn(n, width, generator=gen), torch.randn(n, 1, generator=gen)) for n in sizes]


def mse(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def fastaccum_optimizer(
    provider: str, model: torch.nn.Module, k: int
) -> fastaccum.AccumulatingOptimizer:
    """The fused AdamW class for ``fastaccum.fused``, else ``fastaccum.wrap`` of torch's
    AdamW, over the distributed ``model``."""
    if provider == "fastaccum.fused":
        return fastaccum.optim.AdamW(model.parameters(), lr=1e-4, accum_steps=k, model=model)
    return fastaccum.wrap(torch.optim.AdamW(model.parameters(), lr=1e-4), k, model=model)


def fsdp_window_runner(provider: str, rank: int, k: int, width: int) -> Callable[[], None]:
    """A callable that trains one window of K micro-batches with the FSDP2 ``provider``."""
    from torch.distributed.fsdp import fully_shard

    model = make_model(width)
    if provider == "fastaccum.fused":
        fastaccum.fuse_wgrad(model)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    batches = micro_batches(rank, k, width)
    if provider.startswith("fastaccum"):
        opt = fastaccum_optimizer(provider, model, k)

        def fastaccum_window() -> None:
            for x, y in batches:
                opt.backward(mse(model, x, y), num_items=len(y))
                opt.step()

        return fastaccum_window

    inner = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def native_window() -> None:
        for i, (x, y) in enumerate(batches):
            model.set_requires_gradient_sync(provider == "fsdp.every_step" or i == k - 1)
            (mse(model, x, y) / k).backward()
        inner.step()
        inner.zero_grad()

    return native_window


def window_runner(provider: str, rank: int, k: int, width: int) -> Callable[[], None]:
    """A callable that trains one window of K micro-batches with the DDP ``provider``."""
    model = make_model(width)
    if provider == "fastaccum.fused":
        fastaccum.fuse_wgrad(model)
    ddp = DDP(model)
    batches = micro_batches(rank, k, width)
    if provider.startswith("fastaccum"):
        opt = fastaccum_optimizer(provider, ddp, k)

        def fastaccum_window() -> None:
            for x, y in batches:
                loss = mse(ddp, x, y)
                if provider == "fastaccum.step":
                    loss.backward()
                    opt.step(num_items=len(y))
                else:
                    opt.backward(loss, num_items=len(y))
                    opt.step()

        return fastaccum_window

    inner = torch.optim.AdamW(ddp.parameters(), lr=1e-4)

    def native_window() -> None:
        for i, (x, y) in enumerate(batches):
            last = i == k - 1
            skip_sync = provider == "ddp.no_sync" and not last
            with ddp.no_sync() if skip_sync else contextlib.nullcontext():
                (mse(ddp, x, y) / k).backward()
        inner.step()
        inner.zero_grad()

    return native_window


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # two processes on a small shared machine
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    names = providers(args.fsdp)
    make = fsdp_window_runner if args.fsdp else window_runner
    runners = {p: make(p, rank, args.accum_steps, args.width) for p in names}
    for run in runners.values():
        run()  # warm-up: optimizer state, accumulators, DDP's bucket rebuild
        run()
    times: dict[str, list[float]] = {p: [] for p in names}
    for r in range(args.rounds):
        for p in names[r % len(names) :] + names[: r % len(names)]:
            dist.barrier()
            t0 = time.perf_counter()
            runners[p]()
            dist.barrier()
            times[p].append(time.perf_counter() - t0)
    if rank == 0:
        report(times, args)
    # Free the DDP models while Python is fully alive (see examples/ddp_torchrun.py).
    del runners
    gc.collect()
    dist.destroy_process_group()


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    cuts = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), cuts[1], cuts[7]


def report(times: dict[str, list[float]], args: argparse.Namespace) -> None:
    params = sum(p.numel() for p in make_model(args.width).parameters())
    kind = "fsdp" if args.fsdp else "ddp"
    print(
        f"{kind.upper()} window time ratios, 2 gloo processes on CPU, K={args.accum_steps}, "
        f"{params / 1e6:.2f}M fp32 parameters, {args.rounds} rounds, torch {torch.__version__}"
    )
    for base in (f"{kind}.no_sync", f"{kind}.every_step"):
        print(f"\nper-round time / {base}: median (p20, p80)")
        for p in providers(args.fsdp):
            ratios = [t / b for t, b in zip(times[p], times[base], strict=True)]
            med, p20, p80 = _quantiles(ratios)
            print(f"  {p:<16} {med:6.3f} ({p20:.3f}, {p80:.3f})")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="windows per provider")
    parser.add_argument("--accum-steps", type=int, default=8, help="micro-batches per window")
    parser.add_argument("--width", type=int, default=1024, help="MLP width (5 layers)")
    parser.add_argument("--fsdp", action="store_true", help="shard the MLP with FSDP2")
    args = parser.parse_args(argv)
    if args.rounds < 3 or args.accum_steps < 2:
        print("error: --rounds must be >= 3 and --accum-steps >= 2", file=sys.stderr)
        return 2
    mp.spawn(_worker, args=(2, free_port(), args), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
