"""``fastaccum bench``: train the same byte-level GPT on the same batches with native
PyTorch and with fastaccum, and report time, throughput, memory, loss and deviation.

With a memory cap, the target batch is b x K sequences and ``fastaccum.plan_batch`` picks
the micro-batch that fits the cap; on a GPU the process is also held to the cap, so the
native large batch really runs out of memory. On the CPU nothing can be capped: the large
batch still runs (it is the reference) and the table marks every run whose measured peak
passes the cap.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch

from fastaccum import _backend
from fastaccum.bench.data import VOCAB, ByteBatches, load_bytes, stdlib_sources
from fastaccum.bench.report import build_report, write_json, write_plot
from fastaccum.bench.runs import (
    DTYPES,
    ORDERS,
    BenchConfig,
    RunResult,
    bench_runs,
    forward_precision,
    lm_loss,
    run_all,
    timing_order,
)
from fastaccum.bench.timing import device_name
from fastaccum.workloads import BYTE_GPT_SIZES, ByteGPT


def check_config(config: BenchConfig) -> None:
    """Raise ValueError (with the accepted values) for a setting the bench cannot run."""
    if config.model not in BYTE_GPT_SIZES:
        raise ValueError(f"model must be one of {sorted(BYTE_GPT_SIZES)}, got {config.model!r}")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    for name in ("micro_batch", "accum_steps", "steps"):
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {value}")
    if config.order not in ORDERS:
        raise ValueError(f"order must be one of {list(ORDERS)}, got {config.order!r}")
    if config.memory_cap_gb is not None and not config.memory_cap_gb > 0:
        raise ValueError(f"memory-cap must be > 0 GiB, got {config.memory_cap_gb}")
    try:
        device = torch.device(config.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {config.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA GPU is available; use cpu")
    if device.type == "cuda" and config.memory_cap_gb is not None and config.order == "interleaved":
        raise ValueError(
            "order interleaved keeps every run's model alive at once, which a GPU held to "
            "--memory-cap cannot; use --order sequential (the default on a GPU)"
        )


def memory_kind(config: BenchConfig) -> str:
    """What the bench's peak-memory column measures on ``config``'s device."""
    if torch.device(config.device).type == "cuda":
        where = "CUDA allocator"
    elif config.compile:
        return (
            "not counted on the CPU under --compile (its counter would keep torch.compile "
            "from compiling)"
        )
    else:
        where = "CPU tensors"
    return (
        f"peak tensor memory over the first two steps, model and optimizer state included ({where})"
    )


@contextmanager
def gpu_memory_cap(config: BenchConfig) -> Iterator[None]:
    """On a GPU, hold this process's CUDA allocator to ``config.memory_cap_gb`` GiB for the
    duration (lifted after). Nothing happens without a cap or on the CPU.

    Raises:
        ValueError: the cap exceeds the GPU's memory.
    """
    device = torch.device(config.device)
    if config.memory_cap_gb is None or device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = config.memory_cap_gb * 2**30 / total
    if fraction > 1:
        raise ValueError(
            f"memory-cap {config.memory_cap_gb} GiB exceeds the GPU's {total / 2**30:.1f} GiB"
        )
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def plan_micro_batch(
    config: BenchConfig, initial: torch.nn.Module, batches: ByteBatches
) -> tuple[BenchConfig, dict[str, Any]]:
    """The micro-batch for the target batch (``micro_batch x accum_steps`` sequences) under
    ``config.memory_cap_gb``, from ``fastaccum.plan_batch`` on a copy of the model.

    The micro-batch is the largest divisor of the target that is at most the largest that
    fits, so every micro-batch of a window holds the same number of sequences and the
    windows are the same sequences as without the cap. Returns the config with
    ``micro_batch`` and ``accum_steps`` replaced, and the plan as a JSON-ready dict.

    Raises:
        fastaccum.PlanningError: not even one sequence per micro-batch fits the cap.
    """
    import fastaccum

    device = torch.device(config.device)
    target = config.micro_batch * config.accum_steps
    model = copy.deepcopy(initial).to(device)

    def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        with forward_precision(config):
            return lm_loss(m, *batch)

    plan = fastaccum.plan_batch(
        model,
        lambda n: batches.sample(n, 0, device),
        target,
        optimizer=torch.optim.AdamW(model.parameters(), lr=config.lr),
        loss_fn=loss_fn,
        memory_budget=int(cast(float, config.memory_cap_gb) * 2**30),  # (a cap was given)
        verbose=False,
    )
    largest = min(plan.max_micro_batch_size, target)
    micro = max(d for d in range(1, largest + 1) if target % d == 0)
    planned = dataclasses.replace(config, micro_batch=micro, accum_steps=target // micro)
    return planned, {
        "target_batch": target,
        "largest_micro_batch_that_fits": plan.max_micro_batch_size,
        "micro_batch": micro,
        "accum_steps": target // micro,
        "plan": str(plan),
    }


def describe_data(path: str | None, text: torch.Tensor) -> str:
    """A short name for the training text, with its size."""
    size = f"{text.numel() / 1e6:.1f} MB"
    if path is None:
        return f"the Python standard library's sources ({len(stdlib_sources())} files, {size})"
    return f"{path} ({size})"


def run_training_bench(
    config: BenchConfig, out_dir: Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run every training run of :func:`~fastaccum.bench.runs.bench_runs` on ``config``,
    write ``bench.json`` and ``bench.png`` into ``out_dir`` (when given) and return the
    report (see :func:`~fastaccum.bench.report.build_report`; ``files`` lists what was
    written, ``notes`` what the caller should print).

    Raises:
        ValueError: a bad setting (see :func:`check_config`) or text too short for the model.
        FileNotFoundError: ``config.data`` names no file.
        fastaccum.PlanningError: with a memory cap that not even one sequence fits.
    """
    from tqdm import tqdm

    check_config(config)
    device = torch.device(config.device)
    size = BYTE_GPT_SIZES[config.model]
    text = load_bytes(config.data)
    torch.manual_seed(config.seed)
    initial = ByteGPT(vocab=VOCAB, **size)
    runs = bench_runs()
    notes: list[str] = []
    results: list[RunResult] = []
    plan = None
    with gpu_memory_cap(config):
        batches = ByteBatches(
            text, config.micro_batch, config.accum_steps, size["ctx"], config.seed
        )
        if config.memory_cap_gb is not None:
            config, plan = plan_micro_batch(config, initial, batches)
            batches = ByteBatches(
                text, config.micro_batch, config.accum_steps, size["ctx"], config.seed
            )
        with tqdm(
            total=len(runs) * config.steps,
            desc="bench",
            unit="step",
            file=sys.stderr,
            disable=not progress,
        ) as bar:
            for result in run_all(
                config,
                initial,
                batches,
                runs,
                on_step=lambda: bar.update(1),
                on_run=lambda name: bar.set_description(name),
            ):
                bar.update(config.steps - len(result.step_seconds))  # steps an OOM run skipped
                results.append(result)
    report = build_report(
        config,
        results,
        tokens_per_step=batches.tokens_per_window,
        parameters=sum(p.numel() for p in initial.parameters()),
        device_name=device_name(device),
        memory_kind=memory_kind(config),
        data_name=describe_data(config.data, text),
        extra={"memory_cap": plan, "order": timing_order(config)},
    )
    report["backends"] = _backend.backends_on(device)
    report["extension"] = _backend.extension_status()
    kernels = (_backend.NATIVE, _backend.TRITON)
    slow = [op for op, chosen in report["backends"].items() if chosen not in kernels]
    if slow:
        notes.append(
            f"note: {len(slow)} of fastaccum's {len(report['backends'])} ops ran without "
            f"their {device.type} kernels ({', '.join(slow[:3])}{', ...' if len(slow) > 3 else ''}: "
            f"{report['backends'][slow[0]]}), so the fastaccum timings understate it; "
            "`fastaccum info` says why."
        )
    report["notes"] = notes
    report["files"] = []
    if out_dir is not None:
        report["files"].append(str(write_json(report, out_dir)))
        plot = write_plot(report, out_dir)
        if plot is None:
            notes.append("note: no plot: matplotlib is missing (pip install 'fastaccum[bench]').")
        else:
            report["files"].append(str(plot))
    return report
