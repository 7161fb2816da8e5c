"""The training runs that ``fastaccum bench`` compares, and the loop that measures them.

Every run starts from the same initial weights and trains on the same windows of K
micro-batches (:class:`~fastaccum.bench.data.ByteBatches`) with AdamW and global-norm
clipping; only the way the window's gradient is formed and applied differs:

- ``native-large-batch``: one forward/backward over the whole window (b x K sequences),
  ``clip_grad_norm_``, ``step``, ``zero_grad``: the reference, where it fits in memory;
- ``native-accum``: the native accumulation loop, ``(loss / K).backward()`` per
  micro-batch, then ``clip_grad_norm_``, ``step``, ``zero_grad`` per window;
- ``fastaccum-wrap``: ``fastaccum.wrap(torch.optim.AdamW(...), K)``, ``loss.backward()``
  and ``opt.step()`` per micro-batch;
- ``fastaccum-fused``: ``fastaccum.fuse_wgrad(model)``, ``opt.backward(loss)`` and the
  fused ``fastaccum.optim.AdamW(..., accum_steps=K)``;
- ``fastaccum-act8``: ``fastaccum-fused`` with each forward pass inside
  ``fastaccum.save_activations(ActivationPolicy(bits=8))``: the activations saved for
  backward are kept as 8-bit groups, so its gradients are not exact (it is left out of
  the fp32 deviation check, and its deviation says what the compression costs).

Each run first trains two windows on a throwaway copy with its peak tensor memory counted
(this also pays the one-time costs of first use outside the timing), then trains
``steps`` windows timed. A new way of training is one more :class:`TrainRun` in
:func:`bench_runs`.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F

import fastaccum
from fastaccum.bench.data import ByteBatches
from fastaccum.bench.timing import sync

Window = list[tuple[torch.Tensor, torch.Tensor]]
StepFn = Callable[[Window], torch.Tensor]
"""Trains on one window (one optimizer step); returns the window's mean loss (0-d tensor)."""

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
"""``--dtype`` -> autocast dtype of the forward pass (parameters and optimizer stay fp32)."""

FP32_TOLERANCE = 1e-5
"""Largest parameter deviation from the large-batch reference accepted for fastaccum (fp32)."""


@dataclass(frozen=True)
class BenchConfig:
    """Settings of one ``fastaccum bench`` invocation (lr is AdamW's, per optimizer step)."""

    model: str = "tiny"
    micro_batch: int = 4
    accum_steps: int = 4
    steps: int = 20
    dtype: str = "fp32"
    seed: int = 0
    device: str = "cpu"
    data: str | None = None
    lr: float = 3e-4
    max_grad_norm: float = 1.0
    memory_cap_gb: float | None = None
    compile: bool = False
    """Run every model through ``torch.compile`` (inductor)."""
    order: str = "auto"
    """How the timed steps run: ``interleaved`` (step i of every run, round-robin, before
    step i + 1, so that a shared machine's drift hits every run alike), ``sequential``
    (each run's steps in turn, one model alive at a time), or ``auto``: interleaved on the
    CPU, sequential on a GPU (where a memory cap must hold one run at a time)."""


ORDERS = ("auto", "interleaved", "sequential")


def timing_order(config: BenchConfig) -> str:
    """``config.order`` with ``auto`` resolved: ``interleaved`` or ``sequential``."""
    if config.order != "auto":
        return config.order
    return "interleaved" if torch.device(config.device).type == "cpu" else "sequential"


@dataclass
class TrainRun:
    """One way of training: ``prepare(model, config)`` builds its optimizer around
    ``model`` (a fresh copy of the initial model, already on the device) and returns the
    function that trains on one window."""

    name: str
    description: str
    prepare: Callable[[torch.nn.Module, BenchConfig], StepFn]
    exact: bool = True
    """Whether its update is the large batch's up to rounding (False: lossy by design)."""


@dataclass
class RunResult:
    """What one run measured. Times in seconds, memory in bytes."""

    name: str
    description: str
    exact: bool = True
    status: str = "ok"  # "ok" or "oom"
    step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    max_abs_deviation: float | None = None
    noise_scale: float | None = None
    """The fastaccum optimizer's gradient noise scale after the run (``opt.stats()``)."""
    noise_scale_units: str | None = None
    noise_scale_windows: int = 0
    """Windows the noise scale was estimated from (fastaccum runs)."""
    noise_scale_first_micro_batch: bool = False
    """Part of the estimate came from each window's first micro-batch only (fused-wgrad
    layers write no per-micro-batch gradient), which makes it noisier."""
    critical_batch_hint: str | None = None
    fused_update: bool | None = None
    """Whether the last window's update ran fastaccum's fused kernel (fastaccum runs)."""

    @property
    def seconds_per_step(self) -> float | None:
        """Median time per optimizer step, leaving out the first (it allocates the optimizer
        state)."""
        if not self.step_seconds:
            return None
        timed = self.step_seconds[1:] or self.step_seconds
        return statistics.median(timed)


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy, the mean over every position of the batch, in fp32."""
    logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def forward_precision(config: BenchConfig) -> AbstractContextManager[object]:
    """The context the forward pass runs in: bf16 autocast for ``--dtype bf16``, else none."""
    dtype = DTYPES[config.dtype]
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(config.device).type, dtype=dtype)


def compiled(model: torch.nn.Module, config: BenchConfig) -> torch.nn.Module:
    """``torch.compile(model)`` with ``--compile``, else ``model``. Every run compiles after
    its last change to the model (``fuse_wgrad``), and hands the compiled module to its
    optimizer wrapper."""
    return cast(torch.nn.Module, torch.compile(model)) if config.compile else model


def _large_batch(model: torch.nn.Module, config: BenchConfig) -> StepFn:
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    forward = compiled(model, config)

    def step(window: Window) -> torch.Tensor:
        x = torch.cat([mb[0] for mb in window])
        y = torch.cat([mb[1] for mb in window])
        with forward_precision(config):
            loss = lm_loss(forward, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        opt.step()
        opt.zero_grad()
        return loss.detach()

    return step


def _native_accum(model: torch.nn.Module, config: BenchConfig) -> StepFn:
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    k = config.accum_steps
    forward = compiled(model, config)

    def step(window: Window) -> torch.Tensor:
        total = torch.zeros((), device=config.device)
        for x, y in window:
            with forward_precision(config):
                loss = lm_loss(forward, x, y)
            (loss / k).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        opt.step()
        opt.zero_grad()
        return total / k

    return step


def _check_stepped(stepped: bool, name: str) -> None:
    # Every window holds exactly K micro-batches, so the K-th step() must be the boundary;
    # anything else means the comparison would be between different updates.
    if not stepped:
        raise RuntimeError(f"{name}: the optimizer did not step at the end of a window of K")


def _fastaccum_wrap(model: torch.nn.Module, config: BenchConfig) -> StepFn:
    forward = compiled(model, config)
    opt = fastaccum.wrap(
        torch.optim.AdamW(model.parameters(), lr=config.lr),
        config.accum_steps,
        model=forward,
        max_grad_norm=config.max_grad_norm,
    )

    def step(window: Window) -> torch.Tensor:
        total = torch.zeros((), device=config.device)
        stepped = False
        for x, y in window:
            with forward_precision(config):
                loss = lm_loss(forward, x, y)
            loss.backward()
            stepped = opt.step()
            opt.zero_grad()
            total += loss.detach()
        _check_stepped(stepped, "fastaccum-wrap")
        return total / len(window)

    step.optimizer = opt  # type: ignore[attr-defined]  # train() reads its stats
    return step


def _fused_steps(
    model: torch.nn.Module,
    config: BenchConfig,
    name: str,
    policy: fastaccum.ActivationPolicy | None = None,
) -> StepFn:
    """fuse_wgrad + opt.backward + fastaccum.optim.AdamW; each forward inside
    ``fastaccum.save_activations(policy)`` when a policy is given."""
    fastaccum.fuse_wgrad(model)
    forward = compiled(model, config)
    opt = fastaccum.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        accum_steps=config.accum_steps,
        max_grad_norm=config.max_grad_norm,
        model=forward,
    )

    def step(window: Window) -> torch.Tensor:
        total = torch.zeros((), device=config.device)
        stepped = False
        for x, y in window:
            saving = nullcontext() if policy is None else fastaccum.save_activations(policy)
            with saving, forward_precision(config):
                loss = lm_loss(forward, x, y)
            opt.backward(loss)
            stepped = opt.step()
            opt.zero_grad()
            total += loss.detach()
        _check_stepped(stepped, name)
        return total / len(window)

    step.optimizer = opt  # type: ignore[attr-defined]  # train() reads its stats
    return step


def _fastaccum_fused(model: torch.nn.Module, config: BenchConfig) -> StepFn:
    return _fused_steps(model, config, "fastaccum-fused")


def _fastaccum_act8(model: torch.nn.Module, config: BenchConfig) -> StepFn:
    policy = fastaccum.ActivationPolicy(bits=8, seed=config.seed)
    return _fused_steps(model, config, "fastaccum-act8", policy)


def bench_runs() -> list[TrainRun]:
    """The runs, in the order they execute; the first is the reference."""
    return [
        TrainRun(
            "native-large-batch",
            "torch: one backward over all b*K sequences, clip_grad_norm_, AdamW.step",
            _large_batch,
        ),
        TrainRun(
            "native-accum",
            "torch: (loss/K).backward() per micro-batch, clip_grad_norm_, AdamW.step",
            _native_accum,
        ),
        TrainRun(
            "fastaccum-wrap",
            "fastaccum.wrap(torch.optim.AdamW, K): loss.backward(), opt.step()",
            _fastaccum_wrap,
        ),
        TrainRun(
            "fastaccum-fused",
            "fuse_wgrad + opt.backward(loss) + fastaccum.optim.AdamW(accum_steps=K)",
            _fastaccum_fused,
        ),
        TrainRun(
            "fastaccum-act8",
            "fastaccum-fused with save_activations(ActivationPolicy(bits=8)) (lossy)",
            _fastaccum_act8,
            exact=False,
        ),
    ]


def max_abs_deviation(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> float:
    """Largest |parameter - reference parameter| over every element of every parameter."""
    worst = 0.0
    for name, p in model.named_parameters():
        diff = (p.detach().float().cpu() - reference[name]).abs().max().item()
        worst = max(worst, diff) if not math.isnan(diff) else math.inf
    return worst


class _Trainer:
    """One run training a copy of the initial model, one timed window at a time."""

    def __init__(
        self, run: TrainRun, initial: torch.nn.Module, config: BenchConfig, device: torch.device
    ) -> None:
        self.result = RunResult(run.name, run.description, run.exact)
        self.device = device
        self.model: torch.nn.Module | None = copy.deepcopy(initial).to(device)
        self.step_fn = run.prepare(self.model, config)

    def step(self, batches: ByteBatches, i: int) -> None:
        """Train on window ``i``, timing the optimizer step and recording its loss."""
        window = batches.window(i, self.device)
        sync(self.device)
        t0 = time.perf_counter()
        loss = self.step_fn(window)
        sync(self.device)
        self.result.step_seconds.append(time.perf_counter() - t0)
        self.result.losses.append(loss.item())

    def finish(self) -> None:
        """Copy the wrapper's noise-scale statistics into the result (fastaccum runs)."""
        opt = getattr(self.step_fn, "optimizer", None)
        if isinstance(opt, fastaccum.AccumulatingOptimizer):
            stats = opt.stats()
            self.result.noise_scale = stats["noise_scale"]
            self.result.noise_scale_units = stats["noise_scale_units"]
            self.result.noise_scale_windows = opt.noise_scale_tracker.windows
            self.result.noise_scale_first_micro_batch = bool(opt._fused_seen)
            self.result.critical_batch_hint = stats["critical_batch_hint"]
            self.result.fused_update = stats["fused_update"]


def train(
    run: TrainRun,
    initial: torch.nn.Module,
    batches: ByteBatches,
    config: BenchConfig,
    on_step: Callable[[], None] = lambda: None,
    *,
    steps: int | None = None,
    measure_memory: bool = False,
) -> tuple[RunResult, torch.nn.Module | None]:
    """Train a copy of ``initial`` with ``run`` for ``steps`` windows (default
    ``config.steps``), timing each optimizer step; with ``measure_memory``, also count the
    peak tensor memory (``fastaccum.memory.peak.peak_bytes``: the CUDA allocator's peak, or
    every CPU tensor storage alive at once), which slows the steps it counts.

    Returns the result and the trained model (None when it ran out of memory, which is
    recorded as status ``"oom"``).
    """
    from fastaccum.memory.peak import peak_bytes

    device = torch.device(config.device)
    result = RunResult(run.name, run.description, run.exact)
    trained: list[_Trainer] = []

    def body() -> None:
        trainer = _Trainer(run, initial, config, device)
        trained.append(trainer)
        for i in range(config.steps if steps is None else steps):
            trainer.step(batches, i)
            on_step()
        trainer.finish()

    try:
        if measure_memory:
            peak, _ = peak_bytes(body, device)
        else:
            peak = None
            body()
    except torch.OutOfMemoryError:
        if trained:  # the steps it took before it ran out
            result = trained[0].result
        result.status = "oom"
    if result.status == "oom":
        # Outside the except block, so that the traceback (and the activations its frames
        # hold) is gone before the cache is emptied for the next run.
        trained.clear()
        _release(device)
        return result, None
    trained[0].result.peak_bytes = peak
    return trained[0].result, trained[0].model


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_all(
    config: BenchConfig,
    initial: torch.nn.Module,
    batches: ByteBatches,
    runs: list[TrainRun],
    on_step: Callable[[], None] = lambda: None,
    on_run: Callable[[str], None] = lambda name: None,
) -> Iterator[RunResult]:
    """Train every run and yield its result, in ``runs`` order, with ``max_abs_deviation``
    filled in against the reference: the first run that completed (the large batch, or
    the native accumulation where the large batch ran out of memory).

    Each run first trains a throwaway copy for two windows with its peak memory counted
    (two, so that the optimizer state exists while the second window's activations are
    alive); this pass also pays the one-time costs of first use (library initialization,
    allocator and thread-pool growth) that would otherwise be charged to the timing of
    whichever run comes first (compilation, under ``--compile``). A run that runs out of
    memory there is not timed. On the CPU under ``--compile`` the peak is not counted.

    The timed steps then follow :func:`timing_order`: interleaved, every run keeps its own
    model and step ``i`` of each (starting at run ``i mod n``, so no run always goes
    first) comes before step ``i + 1`` of any; or sequential, one run after the other.
    """
    device = torch.device(config.device)
    # The CPU's counter is a TorchDispatchMode, under which torch.compile runs the model
    # eagerly (and keeps it eager afterwards): no CPU peak under --compile.
    measure = not (config.compile and device.type == "cpu")

    def probe(run: TrainRun) -> RunResult:
        on_run(run.name)
        result, _ = train(run, initial, batches, config, steps=2, measure_memory=measure)
        _release(device)
        if result.status == "oom":
            result.step_seconds.clear()
            result.losses.clear()
        return result

    deviation = _Deviation()
    if timing_order(config) == "sequential":
        for run in runs:
            probed = probe(run)
            if probed.status == "oom":
                yield probed
                continue
            result, model = train(run, initial, batches, config, on_step)
            result.peak_bytes = probed.peak_bytes
            deviation.fill(result, model)
            del model
            _release(device)
            yield result
        return
    probes = [probe(run) for run in runs]
    trainers: dict[str, _Trainer] = {}
    for run, probed in zip(runs, probes, strict=True):
        if probed.status != "oom":
            trainer = trainers[run.name] = _Trainer(run, initial, config, device)
            trainer.result.peak_bytes = probed.peak_bytes
    active = list(trainers.values())
    for i in range(config.steps):
        start = i % len(active) if active else 0
        for trainer in active[start:] + active[:start]:
            on_run(trainer.result.name)
            try:
                trainer.step(batches, i)
            except torch.OutOfMemoryError:
                trainer.result.status = "oom"
            if trainer.result.status == "oom":  # (its untaken steps are the caller's to count)
                trainer.model = None
                _release(device)
            else:
                on_step()
        active = [t for t in active if t.result.status != "oom"]
    for trainer in active:
        trainer.finish()
    for run, probed in zip(runs, probes, strict=True):
        if run.name not in trainers:
            yield probed
            continue
        trainer = trainers.pop(run.name)
        deviation.fill(trainer.result, trainer.model)
        trainer.model = None
        yield trainer.result


class _Deviation:
    """Fills each result's largest parameter deviation from the first trained model."""

    def __init__(self) -> None:
        self.reference: dict[str, torch.Tensor] | None = None

    def fill(self, result: RunResult, model: torch.nn.Module | None) -> None:
        if model is None:
            return
        if self.reference is None:
            self.reference = {
                n: p.detach().float().cpu().clone() for n, p in model.named_parameters()
            }
        result.max_abs_deviation = max_abs_deviation(model, self.reference)
