"""Command line: ``fastaccum bench``, ``bench-ops``, ``plan`` and ``info`` (also
``python -m fastaccum``).

``bench`` trains a byte-level GPT on real text (the Python standard library's sources, or
``--data FILE``) with native PyTorch (one large batch; the native accumulation loop) and
with fastaccum (``wrap``; ``opt.backward`` + fused wgrad + the fused AdamW; the same with
8-bit saved activations) on the same seeds and batches, then prints time per step,
tokens/s, peak memory, final loss and each run's largest parameter deviation from the
large-batch reference, and writes ``bench.json`` and ``bench.png`` to ``--out``.

``bench-ops`` is the op micro-benchmark: one micro-step of native per-parameter ``add_``
accumulation against fastaccum's fused ``accumulate_`` on a GPT-2-small parameter set.

``plan`` prints ``fastaccum.plan_batch``'s plan (micro-batch, accumulation steps, measured
memory) for the bench model and a target batch.

``info`` prints what this installation runs on: the versions, whether the compiled
extension loaded (and why not), its CUDA kernels, Triton, the GPUs, and the backend each
op takes on each device. Paste it into bug reports.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

# time_once / time_call are imported from here by benchmarks/ and the GPU scripts.
from fastaccum.bench.timing import device_name, time_call, time_once

__all__ = ["build_parser", "device_name", "main", "time_call", "time_once"]


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cmd_bench(args: argparse.Namespace) -> int:
    from fastaccum.bench.report import format_table
    from fastaccum.bench.runs import BenchConfig
    from fastaccum.bench.training import check_config, run_training_bench

    if args.threads is not None and args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    config = BenchConfig(
        model=args.model,
        micro_batch=args.micro_batch,
        accum_steps=args.accum_steps,
        steps=args.steps,
        dtype=args.dtype,
        seed=args.seed,
        device=args.device or _default_device(),
        data=args.data,
        lr=args.lr,
        memory_cap_gb=args.memory_cap,
        compile=args.compile,
        order=args.order,
    )
    try:
        check_config(config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif torch.device(config.device).type == "cpu":
        # One thread by default on the CPU: the default model's ops are small, and on a busy
        # machine several threads per op wait on each other (measured 10x slower on a loaded
        # 2-core box); both sides of every comparison get the same thread count.
        torch.set_num_threads(1)
    from fastaccum.memory.planner import PlanningError

    try:
        report = run_training_bench(config, Path(args.out), progress=not args.no_progress)
    except (ValueError, FileNotFoundError, PlanningError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:  # main() may be called in-process (tests, notebooks): leave threads as found
        torch.set_num_threads(threads)
    for note in report["notes"]:
        print(note, file=sys.stderr)
    print(format_table(report))
    print("wrote " + ", ".join(report["files"]))
    return 0


def _cmd_bench_ops(args: argparse.Namespace) -> int:
    from fastaccum.bench.ops import bandwidths, format_ops_table, run_ops_bench

    if args.repeats < 1:
        print(f"error: --repeats must be >= 1, got {args.repeats}", file=sys.stderr)
        return 2
    device = torch.device(args.device or _default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda was given but no CUDA GPU is available", file=sys.stderr)
        return 2
    rows = run_ops_bench(args.params, device, args.dtype, args.repeats)
    nbytes = max(int(r["params"]) for r in rows) * 4
    copy, add = bandwidths(nbytes, device, args.repeats)
    print(format_ops_table(rows, copy / 1e9, add / 1e9, device))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import fastaccum
    from fastaccum.bench.data import VOCAB, ByteBatches, load_bytes
    from fastaccum.bench.runs import lm_loss
    from fastaccum.workloads import BYTE_GPT_SIZES, ByteGPT

    device = torch.device(args.device or _default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda was given but no CUDA GPU is available", file=sys.stderr)
        return 2
    if args.memory_budget is not None and not args.memory_budget > 0:
        print(f"error: --memory-budget must be > 0 GiB, got {args.memory_budget}", file=sys.stderr)
        return 2
    size = BYTE_GPT_SIZES[args.model]
    torch.manual_seed(args.seed)
    model = ByteGPT(vocab=VOCAB, **size).to(device)
    batches = ByteBatches(load_bytes(args.data), 1, 1, size["ctx"], args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    budget = None if args.memory_budget is None else int(args.memory_budget * 2**30)
    try:
        plan = fastaccum.plan_batch(
            model,
            lambda n: batches.sample(n, 0, device),
            args.target,
            optimizer=optimizer,
            loss_fn=lambda m, batch: lm_loss(m, *batch),
            memory_budget=budget,
            headroom=args.headroom,
        )
    except (ValueError, TypeError, fastaccum.PlanningError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model: bench {args.model} ({sum(p.numel() for p in model.parameters()):,} params)")
    print(plan)
    return 0


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from fastaccum.workloads import BYTE_GPT_SIZES

    p = sub.add_parser(
        "plan",
        help="plan micro-batch and accumulation steps for the bench model under a memory budget",
        description="Measure real training steps of the bench's byte-level GPT (AdamW, "
        "fastaccum.wrap) and print fastaccum.plan_batch's plan for a target batch.",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--model",
        choices=list(BYTE_GPT_SIZES),
        default="tiny",
        help="bench model size, as for `fastaccum bench` (default: tiny)",
    )
    p.add_argument("--target", type=int, default=256, help="target batch, sequences (default: 256)")
    p.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        help="GiB of tensor memory to plan for (default: what the device has free)",
    )
    p.add_argument(
        "--headroom",
        type=float,
        default=0.1,
        help="fraction of the budget kept free, in [0, 1) (default: 0.1)",
    )
    p.add_argument("--data", default=None, help="text file (default: the stdlib's sources)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batches (default: 0)")
    p.set_defaults(func=_cmd_plan)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from fastaccum.bench.runs import DTYPES, ORDERS, BenchConfig
    from fastaccum.workloads import BYTE_GPT_SIZES

    d = BenchConfig()
    p = sub.add_parser(
        "bench",
        help="train a GPT on real text with native PyTorch and with fastaccum, side by side",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--model",
        choices=list(BYTE_GPT_SIZES),
        default=d.model,
        help=f"model size (default: {d.model}; gpt2 is GPT-2 small's 12 blocks of width 768)",
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        default=d.micro_batch,
        help=f"sequences per micro-batch, b (default: {d.micro_batch})",
    )
    p.add_argument(
        "--accum-steps",
        type=int,
        default=d.accum_steps,
        help=f"micro-batches per optimizer step, K (default: {d.accum_steps})",
    )
    p.add_argument(
        "--steps", type=int, default=d.steps, help=f"optimizer steps per run (default: {d.steps})"
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=d.dtype,
        help="forward precision: fp32, or bf16 autocast with fp32 parameters (default: fp32)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="initial weights and batches")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default: {d.lr})")
    p.add_argument(
        "--data",
        default=None,
        help="a text file to train on (default: the Python standard library's .py sources)",
    )
    p.add_argument(
        "--out",
        default="fastaccum-bench",
        help="folder for bench.json and bench.png (default: ./fastaccum-bench)",
    )
    p.add_argument(
        "--memory-cap",
        type=float,
        default=None,
        metavar="GiB",
        help="memory cap: fastaccum.plan_batch picks the micro-batch that fits it for the "
        "target batch (micro-batch x accum-steps); on a GPU the process is held to the cap, "
        "so the native large batch runs out of memory; on the CPU runs over the cap are marked",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: 1 on the CPU, for stable timings)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="run every model through torch.compile (inductor); fastaccum's fused layers "
        "run eagerly between the compiled graphs",
    )
    p.add_argument(
        "--order",
        choices=list(ORDERS),
        default=d.order,
        help="timed steps: interleaved (step i of every run before step i+1, so that a "
        "shared machine's drift hits every run alike), sequential (one run after another), "
        "or auto: interleaved on the CPU, sequential on a GPU (default: auto)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench)


def _add_bench_ops(sub: argparse._SubParsersAction) -> None:
    from fastaccum.bench.ops import DTYPES

    p = sub.add_parser(
        "bench-ops",
        help="time one micro-step of native add_ accumulation against fused accumulate_",
        description=__doc__.split("\n\n")[2],
    )
    p.add_argument(
        "--params",
        choices=["gpt2-small", "tiny"],
        default="gpt2-small",
        help="parameter set (default: gpt2-small, 124M parameters)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="default: cuda when available, else cpu",
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=sorted(DTYPES),
        default=["bf16", "fp32"],
        help="gradient dtypes to run (default: bf16 fp32)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed runs per measurement; the median is reported (default: 5)",
    )
    p.set_defaults(func=_cmd_bench_ops)


def _cmd_info(args: argparse.Namespace) -> int:
    import json
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from fastaccum import _backend

    info = _backend.describe()
    try:
        info["fastaccum"] = version("fastaccum")
    except PackageNotFoundError:
        info["fastaccum"] = "not installed (source tree)"
    info["python"] = platform.python_version()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cuda = f"CUDA {info['torch_cuda']}" if info["torch_cuda"] else "CPU build"
    triton = info["triton_version"] or "not installed"
    if info["triton"] and info["triton_interpreted"]:
        triton += " (interpreter: TRITON_INTERPRET=1)"
    gpus = ", ".join(f"{g['name']} (sm_{g['capability'].replace('.', '')})" for g in info["gpus"])
    lines = [
        f"fastaccum      {info['fastaccum']}",
        f"python         {info['python']}",
        f"torch          {info['torch']} ({cuda})",
        f"GPUs           {gpus or 'none'}",
        f"extension      {info['extension_status']}",
        f"CUDA kernels   {'compiled' if info['cuda_kernels'] else 'not compiled'}",
        f"Triton         {triton}",
        f"forced backend {info['forced_backend'] or 'none (FASTACCUM_BACKEND unset)'}",
    ]
    if info["wgrad_low_precision_cuda"]:
        lines.append(f"bf16/fp16 wgrad on CUDA: {info['wgrad_low_precision_cuda']}")
    devices = list(next(iter(info["ops"].values())))
    width = max(map(len, info["ops"]))
    header = "op".ljust(width) + "".join(f"  {d:<10}" for d in devices)
    lines += ["", header.rstrip()]
    errors = sorted(
        {c for chosen in info["ops"].values() for c in chosen.values() if c.startswith("error: ")}
    )
    for op, chosen in info["ops"].items():
        cells = ["error" if chosen[d].startswith("error: ") else chosen[d] for d in devices]
        lines.append((op.ljust(width) + "".join(f"  {c:<10}" for c in cells)).rstrip())
    if errors:
        lines += ["", *errors]
    lines += [
        "",
        "native: fastaccum._C's C++ (CPU) or CUDA kernels; triton: fastaccum's Triton kernels;",
        "reference: plain PyTorch ops (correct, but slower).",
    ]
    print("\n".join(lines))
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="what this installation runs on: versions, extension, kernels, backends",
        description="Print what this installation runs on: the versions, whether the "
        "compiled extension loaded (and why not), its CUDA kernels, Triton, the GPUs, and "
        "the backend each op takes on each device.",
    )
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=_cmd_info)


def build_parser() -> argparse.ArgumentParser:
    """The ``fastaccum`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="fastaccum",
        description="fastaccum's command line (also `python -m fastaccum`): bench, bench-ops, "
        "plan and info. `fastaccum COMMAND --help` describes each.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    _add_bench_ops(sub)
    _add_plan(sub)
    _add_info(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastaccum`` console script; returns the exit status (2: bad
    arguments)."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
