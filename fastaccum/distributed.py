"""torch.distributed integration: DDP and FSDP2 under fastaccum's window accumulation.

``fastaccum.wrap(opt, K, model=ddp_or_fsdp_model)`` makes the wrapper drive the model's
gradient synchronization: one reduction per window, normalization over every item of
every rank, and the same clipping, skip and GradScaler decisions on all ranks. Nothing
here is a communication engine of its own: DDP's buckets and FSDP2's reduce-scatter do
the moving, and one small all-gather per window carries the counts.

DDP
---
Sync flag. DDP decides in its *forward* whether the coming backward reduces (the
``require_backward_grad_sync`` flag that ``no_sync()`` toggles). The wrapper knows the
micro-step, so it sets that flag at wrap time and after every ``step()`` for the next
micro-batch: off inside a window, on for the window's last micro-batch. The user writes
nothing extra; ``with opt.accumulate():`` does the same explicitly, and
``opt.accumulate(last=True)`` closes a window early (a partial last window).

Boundary reduction. The window lives in fastaccum's fp32 accumulators, not in ``.grad``:
``opt.backward``'s post-accumulate-grad hooks run inside autograd's AccumulateGrad, before
DDP's reducer hook on the same parameter, so DDP sees no ``.grad`` there (its bucket slot
is zeroed), and fused-wgrad layers never write ``.grad`` at all. So the wrapper registers a
DDP communication hook. On the boundary micro-batch under ``opt.backward`` (its weight
``num_items`` is known before backward starts) the hook all-reduces, per DDP bucket, the
bucket's parameters' *accumulators* (which by then hold the last micro-batch too),
flattened into one fp32 buffer, and writes the sum back into the accumulators in one
``accumulate_`` pass that also yields the window norm and the non-finite flag. DDP's
buckets thus carry exactly one all-reduce per bucket per window, overlapped with the
boundary backward; parameters unused on that micro-batch are in their buckets too, so
they are reduced as well. DDP's own write of the (zero) bucket into ``.grad`` is dropped;
with ``gradient_as_bucket_view=False`` (DDP's default) that write allocates a transient
gradient-sized ``.grad`` at the boundary, with ``True`` it is a view of DDP's bucket.

``loss.backward(); opt.step(num_items=n)`` is exact too, without the overlap: the weight
of the last micro-batch is only known at ``step()``, after backward, so the hook passes
the bucket through untouched, ``step()`` folds the gradient with its weight, and the
boundary reduces the accumulators itself with the same per-bucket all-reduce (buckets of
DDP's ``bucket_bytes_cap``, in reverse parameter order as DDP does). ``flush()`` of a
partial window, whose last micro-batch ran without sync, takes the same path. The
alternative design, DDP sync always off and every reduction done at the boundary, would
have been as exact and a little simpler, but it gives up DDP's overlap of the reduction
with the last backward and its bucket order; the hook keeps both for ``opt.backward``.
All ranks must take the same path (both ``opt.backward`` or both ``loss.backward``), as
they must run the same collectives.

BatchNorm windows. DDP broadcasts rank 0's buffers (``broadcast_buffers=True``, its
default) at every forward after a synced backward: the first micro-batch of a window, the
second under ``static_graph=True``, the first after a resume. AccumBatchNorm keeps its
windows (statistics, and ``mode="window"``'s gradient sums, of this window and the
previous one) in plain tensor attributes, not buffers, so the broadcast never reaches
them: each rank's window is its own until the window's exchange merges it (statistics by
Chan's formula, gradient sums added), after which the running statistics and the previous
window are the same on every rank.

FSDP2 (``fully_shard``)
-----------------------
Gradients leave FSDP2 already reduced (sharded ``DTensor`` ``.grad``), so a micro-batch's
weight must be in its gradient before the reduction: ``opt.backward(loss, num_items=n)``
seeds backward with ``n`` (the loss scaled by its item count) and folds FSDP's result with
weight 1. ``loss.backward(); opt.step(num_items=n)`` cannot be made exact there and raises
a ValueError naming ``opt.backward``; ``num_items`` left out (equal weights) works on both
paths. FSDP2 averages over the data-parallel ranks; the wrapper multiplies that factor
back, so it normalizes by the global item count itself. Two modes:

* default (``reduce_scatter_every_micro_step=False``): ``set_requires_gradient_sync(False)``
  off the boundary. FSDP2 keeps the window's *unsharded* gradient on every rank between
  micro-batches (in the parameter dtype, or in ``MixedPrecisionPolicy.reduce_dtype`` when
  that differs: set it to float32 for fp32 accumulation of low-precision parameters) and
  reduce-scatters once per window; fastaccum's fp32 accumulator holds the local shard.
  Memory: one full unsharded gradient per rank. Communication: one reduce-scatter per
  window. A partial window must end inside ``with opt.accumulate(last=True):``.
* ``reduce_scatter_every_micro_step=True``: FSDP2 reduce-scatters each micro-batch and
  fastaccum adds each shard into its fp32 shard accumulator. Memory: the fp32 shard only
  (1/world of the parameters). Communication: K reduce-scatters per window.

HSDP (``fully_shard(..., mesh=)`` with a 2-D (replicate, shard) mesh over all ranks) works
the same way: the window's counts are exchanged over all ranks, and the shards' sums of
squares, held by every replica alike, are divided by the number of replicas.

Fused-wgrad layers see FSDP2's unsharded copies of their parameters. In the default mode,
when FSDP2 keeps the window's gradient in fp32 (fp32 parameters, or
``reduce_dtype=torch.float32``), they add their weight gradients straight into it
(:meth:`FSDPWindow.window_grad`): the unsharded ``.grad``, or FSDP2's
``unsharded_accumulated_grad`` when it upcasts for the reduction. Otherwise they run as
plain layers. The fused optimizer classes take FSDP2 models (``model=``): their window
update runs on each rank's local shards of the parameters, accumulators and states, with
the clip by the norm over all ranks' shards; the state stays torch's, as sharded DTensors.

Dropping the wrapper
--------------------
The model outlives the wrapper, and DDP keeps its communication hook for good, so the hook
and the window reach the wrapper only weakly. Once it is dropped: DDP syncs every backward
again and the hook averages each bucket over the ranks, as DDP does without a hook; FSDP2
reduces every backward again, and the partial window it kept unsharded is discarded with
the wrapper's accumulators. A new wrapper takes the model over (DDP's hook included),
and an older wrapper dropped after that leaves the model to the new one.

Counts and decisions
--------------------
Once per window, one all-gather of a small float64 vector carries each rank's item total,
which parameters received a gradient, the AccumBatchNorm window statistics and, under
FSDP2, the shard's squared norm and non-finite flag; every rank sums it in rank order, so
all ranks divide by the same global item count and make the same clip, skip and GradScaler
decisions (from the reduced gradient). The host reads it together with the window norm in
the wrapper's single host sync. The applied gradient is the mean over all items of all
ranks' window.

Warnings
--------
* DDP ``find_unused_parameters=True`` with parameter usage that varies between
  micro-batches: detected from which parameters receive gradients. fastaccum reduces every
  accumulator, so the step is right where native ``no_sync`` accumulation would sync only
  what the last micro-batch used; the warning says so once.
* DDP ``find_unused_parameters=False`` with a parameter that gets no gradient on the
  boundary micro-batch: fastaccum still reduces it, but DDP raises on the next forward
  ("Expected to have finished reduction in the prior iteration"); warned, with the fix.
* DDP ``static_graph=True``: DDP's first backward must be a synced one (under ``no_sync``
  its reducer fails with "expect_autograd_hooks_ INTERNAL ASSERT FAILED"), so the wrapper
  keeps sync on for the very first micro-batch; the hook passes it through, so it costs
  no communication. If that first forward still ran without sync (a ``no_sync()`` of the
  user's own), ``opt.backward`` raises a RuntimeError that says so before DDP's reducer
  would fail. With varying parameter usage, static_graph trains exactly here (every
  accumulator is reduced).
* A loss already divided by K (``loss / K`` or ``loss * (1/K)``, possibly under
  ``scaler.scale`` or a dtype cast) on top of the item-count normalization: detected from
  the loss's autograd node in ``opt.backward(loss)`` only. ``loss.backward()`` hands the
  wrapper no loss, and a division folded into the model or into a reduction
  (``sum() / (n * K)``) leaves no trace that can be told apart honestly; those are not
  detected.
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from fastaccum.nn.batchnorm import accum_batchnorms
from fastaccum.ops.accumulate import accumulate_unchecked, sumsq_unchecked

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from fastaccum.nn.batchnorm import _AccumBatchNorm
    from fastaccum.optim.wrapper import AccumulatingOptimizer

__all__ = ["merge_batchnorm_windows"]


# --------------------------------------------------------------------------- BatchNorm


def _pack_batchnorm(modules: list[_AccumBatchNorm], device: torch.device) -> torch.Tensor:
    """[sample count of each module, gradient-sample count of each module, window means of
    all channels, window M2 of all channels, window gradient sums (mode="window": sums of g
    and of g * xhat, 2 per channel) of all channels]."""
    if not modules:
        return torch.zeros(0, dtype=torch.float64, device=device)
    counts = torch.tensor(
        [float(m.window_count) for m in modules] + [float(m.window_grad_count) for m in modules],
        dtype=torch.float64,
    )
    means = [m.window_mean.to(device=device, dtype=torch.float64) for m in modules]
    m2s = [m.window_m2.to(device=device, dtype=torch.float64) for m in modules]
    grads = [m.window_grad.to(device=device, dtype=torch.float64).reshape(-1) for m in modules]
    return torch.cat([counts.to(device), *means, *m2s, *grads])


def _merge_batchnorm(
    modules: list[_AccumBatchNorm], gathered: torch.Tensor, counts: list[list[float]]
) -> None:
    """Merge every rank's window statistics and gradient sums into each module,
    identically on all ranks.

    ``gathered`` is (world, len(pack)); ``counts[r][i]`` is rank r's sample count of module
    i and ``counts[r][M + i]`` its gradient-sample count (M modules), read on the host. With
    N = sum n_r and mean = sum n_r mean_r / N, the merged M2 = sum M2_r + sum n_r (mean_r -
    mean)^2: Chan's pairwise merge applied to all ranks at once, with deviations taken from
    the final mean (no cancellation), in float64. Gradient sums and their counts add up, so
    every rank's next window takes its gradient means over the previous window of all ranks
    (as its reference statistics do), and the state every rank saves at a boundary is the
    same.
    """
    if not modules:
        return
    sizes = [m.num_features for m in modules]
    total = sum(sizes)
    n_mod = len(modules)
    n_rank = torch.tensor(
        [row[:n_mod] for row in counts], dtype=torch.float64, device=gathered.device
    )  # (world, M)
    n = n_rank.repeat_interleave(torch.tensor(sizes, device=gathered.device), dim=1)
    head = 2 * n_mod
    means = gathered[:, head : head + total]
    m2s = gathered[:, head + total : head + 2 * total]
    grads = gathered[:, head + 2 * total : head + 4 * total].sum(0)
    n_all = n.sum(0)
    safe = n_all.clamp_min(1.0)
    mean = (n * means).sum(0) / safe
    m2 = m2s.sum(0) + (n * (means - mean).square()).sum(0)
    offset = 0
    for i, (module, size) in enumerate(zip(modules, sizes, strict=True)):
        window = slice(offset, offset + size)
        grad = grads[2 * offset : 2 * (offset + size)].view(2, size)
        offset += size
        grad_count = int(sum(row[n_mod + i] for row in counts))
        if grad_count > 0:
            module.window_grad.copy_(grad)
            module.window_grad_count = grad_count
        count = int(sum(row[i] for row in counts))
        if count == 0:
            continue
        module.window_mean.copy_(mean[window])
        module.window_m2.copy_(m2[window])
        module.window_count = count


class RanksDisagreeError(ValueError):
    """The ranks fed one window in ways that cannot be combined (``num_items`` on some
    ranks only, or ``opt.backward`` on some and ``loss.backward(); opt.step()`` on others).
    Raised on every rank at the boundary, with the window discarded everywhere."""


def _sum64(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The float64 sum of scalar tensors, on the first one's device."""
    device = tensors[0].device
    return torch.stack([t.to(device=device, dtype=torch.float64) for t in tensors]).sum()


def _gather(vector: torch.Tensor, group: Any) -> torch.Tensor:
    parts = [torch.empty_like(vector) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, vector, group=group)
    return torch.stack(parts)


def _check_window_kinds(counts: list[float], world: int) -> None:
    """Raise :class:`RanksDisagreeError` when the ranks fed the window differently
    (``counts``: :meth:`_DistributedWindow._window_kind` added over the ranks)."""
    with_items, without_items, by_backward, by_step = (round(c) for c in counts)
    problems = []
    if with_items and without_items:
        problems.append(
            f"num_items was given on {with_items} of {world} ranks and not on {without_items}: "
            "give it on every rank (each rank's own item count) or on none"
        )
    if by_backward and by_step:
        problems.append(
            f"the window's last micro-batch went through opt.backward(loss) on {by_backward} "
            f"of {world} ranks and through loss.backward(); opt.step() on {by_step}: every "
            "rank must take the same path"
        )
    if problems:
        raise RanksDisagreeError(
            "fastaccum: the ranks fed this window in ways that cannot be combined: "
            + "; ".join(problems)
            + ". The window was discarded on every rank; parameters and optimizer state are "
            "unchanged"
        )


def merge_batchnorm_windows(model: torch.nn.Module, group: Any = None) -> None:
    """Merge each AccumBatchNorm window of ``model`` across the ranks of ``group``.

    Every rank ends with the (count, mean, M2) of all ranks' window samples together
    (``window_count``, ``window_mean``, ``window_m2``), so the next ``end_window`` updates
    identical running statistics everywhere. One all-gather for all modules. The wrapper
    does this itself at each boundary (inside its once-per-window exchange); call it when
    closing windows by hand with ``fastaccum.nn.batchnorm.end_window``.

    Raises:
        RuntimeError: torch.distributed is not initialized.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "merge_batchnorm_windows needs an initialized process group; call "
            "torch.distributed.init_process_group first"
        )
    modules = accum_batchnorms(model)
    if not modules:
        return
    device = modules[0].window_mean.device
    gathered = _gather(_pack_batchnorm(modules, device), group)
    counts = gathered[:, : 2 * len(modules)].tolist()
    _merge_batchnorm(modules, gathered, counts)


# --------------------------------------------------------------------------- loss checks


def loss_divided_by(loss: torch.Tensor, divisor: int, depth: int = 4) -> bool:
    """True when ``loss`` was made by dividing by ``divisor`` (or multiplying by its
    inverse) in one of its last ``depth`` autograd steps, looking through scalar
    multiplications (``scaler.scale``) and dtype casts."""
    node = loss.grad_fn
    for _ in range(depth):
        if node is None:
            return False
        name = type(node).__name__
        other = getattr(node, "_saved_other", None)
        scalar = isinstance(other, torch.Tensor) and other.numel() == 1
        if scalar and getattr(node, "_saved_self", None) is None:
            value = float(cast(torch.Tensor, other))  # a one-element tensor (``scalar``)
            if name.startswith("Div") and value == divisor:
                return True
            if name.startswith("Mul") and math.isclose(value * divisor, 1.0, rel_tol=1e-6):
                return True
        elif not name.startswith("ToCopy"):
            return False
        node = node.next_functions[0][0] if node.next_functions else None
    return False


# --------------------------------------------------------------------------- the window


class _DistributedWindow:
    """What the wrapper asks of a distributed model; see the module docs."""

    weights_in_loss = False  # True: opt.backward seeds backward with num_items
    sharded = False  # True: accumulators hold disjoint shards (norms add over ranks)
    every_micro_step = False  # True: sharded, and each micro-batch arrives reduced
    replicas = 1  # ranks holding each shard (HSDP), whose shard sums of squares are equal
    # every_micro_step: each global micro-batch's item count in the last window
    micro_sizes: list[float] | None = None
    # otherwise: the last window's noise-scale sums over every rank (see _noise_sums)
    pooled: list[float] | None = None
    grad_factor = 1.0  # the reduction's own divisor, multiplied back at the boundary

    def __init__(self, opt: AccumulatingOptimizer, model: torch.nn.Module, group: Any) -> None:
        # The wrapper holds its window; the window reaches back only weakly, so that
        # dropping the wrapper frees both at once (and runs the finalizers below).
        self._opt = weakref.ref(opt)
        self.model = model
        _DRIVERS[model] = weakref.ref(self)
        self.group = group
        self.batchnorms = accum_batchnorms(model)

    @property
    def opt(self) -> AccumulatingOptimizer:
        opt = self._opt()
        assert opt is not None, "the wrapper calls its window while it is alive"
        return opt

    # Hooks the wrapper calls; the defaults suit both kinds.
    def set_sync(self, on: bool) -> None:
        raise NotImplementedError

    def start_window(self) -> None:
        """Called when a window starts (after a step, a skip, or a restore)."""

    def grads_expected(self, boundary: bool) -> bool:
        """Whether ``step()`` must find gradients on this micro-batch."""
        return True

    def check_step(self, uses_num_items: bool) -> None:
        """Raise before anything is folded when ``step(num_items=...)`` cannot be exact."""

    def before_backward(self) -> None:
        """Called by ``opt.backward`` before ``loss.backward()``; may raise."""

    def after_backward(self) -> None:
        """Called after ``opt.backward``'s ``loss.backward()`` returned."""

    def after_micro_step(self) -> None:
        """Called after a micro-batch was folded, before a boundary is finished."""

    def check_flush(self) -> None:
        """Raise when a partial window cannot be finished."""

    def any_rank_holds(self, micro_steps: int) -> bool:
        """Whether any rank's partial window holds a micro-batch (``flush()`` on every
        rank: a rank whose window is empty must still join the others' boundary)."""
        return micro_steps > 0

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def as_grad(self, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return t

    def reduce_accumulators(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Make the accumulators hold the reduced window; (norm_sq, non-finite) of the
        reduced, replicated accumulators, or (None, None) when they are local shards."""
        return None, None

    def reduced_fused_sq(self) -> torch.Tensor | None:
        """After :meth:`reduce_accumulators`: the part of its norm_sq in fused-wgrad
        layers' accumulators, or None (none, or local shards)."""
        return None

    def window_grad(self, t: torch.Tensor) -> torch.Tensor:
        """The window gradient a sharded window keeps unsharded for ``t`` (FSDP2)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no unsharded window gradient")

    def first_micro_sumsq(self) -> torch.Tensor | None:
        """Sharded windows, after the window's first micro-batch: the squared norm of this
        rank's gradient of it (weighted, still loss-scaled), or None."""
        return None

    def _window_kind(self, device: torch.device) -> torch.Tensor:
        """How this rank fed its window, as counts to add over the ranks: [num_items given,
        not given, last micro-batch through opt.backward, through loss.backward() and
        step()]; zeros for an empty window (a rank joining another's flush)."""
        opt = self.opt
        kind = torch.zeros(4, dtype=torch.float64, device=device)
        if opt._uses_num_items is not None:
            kind[0 if opt._uses_num_items else 1] = 1.0
        if opt._by_backward is not None:
            kind[2 if opt._by_backward else 3] = 1.0
        return kind

    def _noise_sums(
        self, micro: torch.Tensor, fused_first: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """This rank's part of the noise-scale sums (``fastaccum.stats.pooled_terms``), to
        be added over the ranks so that every rank estimates from every rank's
        micro-batches: (count, sum of squared norms, sum of 1 / size) of the per-micro-batch
        norms, then the same of the first micro-batch's norm of the fused set. Zero where
        this rank has none (and when each micro-batch arrives reduced, which needs none)."""
        sums = torch.zeros(6, dtype=torch.float64, device=device)
        weights = self.opt._weights
        if self.every_micro_step or not weights or min(weights) <= 0:
            return sums
        if micro.numel() and micro.numel() == len(weights):
            sums[0] = float(len(weights))
            sums[1] = micro.to(device=device, dtype=torch.float64).sum()
            sums[2] = math.fsum(1.0 / w for w in weights)
        if fused_first is not None:
            sums[3] = 1.0
            sums[4] = fused_first.to(device=device, dtype=torch.float64)
            sums[5] = 1.0 / weights[0]
        return sums

    def accepts_wgrad(self, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Sharded windows: whether a fused layer whose parameters are ``weight`` (and
        ``bias``) adds its gradients into the window's gradient through this window."""
        return False

    # ------------------------------------------------------------------ exchange

    def finish_window(
        self,
        norm_sq: torch.Tensor | None,
        bad: torch.Tensor | None,
        micro: torch.Tensor,
        fused_first: torch.Tensor | None = None,
    ) -> tuple[float, float, bool, list[float], tuple[float, float] | None]:
        """Reduce the window and exchange counts: (global item total, window norm_sq,
        non-finite, this rank's micro-batch sums of squares, fused), identical on all
        ranks but the last two. ``norm_sq``/``bad`` are the local accumulators' (used when
        sharded). ``fused`` is (the window's norm_sq in fused-wgrad layers, this rank's
        ``fused_first`` or NaN) when the accumulators are replicated and hold fused-wgrad
        layers, or sharded (the whole window then counts as fused), else None. The
        noise-scale sums of every rank (:meth:`_noise_sums`) are left in ``self.pooled``.
        All of it comes back with the window's one host sync."""
        opt = self.opt
        replicated_sq, replicated_bad = self.reduce_accumulators()
        # (fused part of the window's norm_sq, first micro-batch's) to bring to the host;
        # sharded, the whole window stands in the first micro-batch's place
        fused: list[torch.Tensor] = []
        if fused_first is not None and self.sharded:
            fused = [fused_first.reshape(1)]
        elif not self.sharded:
            fused_sq = self.reduced_fused_sq()
            if fused_sq is not None:
                first_sq = torch.full_like(fused_sq, math.nan)
                if fused_first is not None:
                    first_sq = fused_first.to(device=fused_sq.device, dtype=fused_sq.dtype)
                fused = [torch.stack([fused_sq, first_sq])]
        device = micro.device
        params = opt._params
        touched = torch.tensor(
            [1.0 if id(p) in opt._touched else 0.0 for p in params], dtype=torch.float64
        )
        if self.sharded:
            assert norm_sq is not None and bad is not None  # given when sharded
            local_sq = norm_sq.to(device=device, dtype=torch.float64).reshape(1)
            local_bad = bad.to(device=device, dtype=torch.float64).reshape(1)
        else:
            local_sq = local_bad = torch.zeros(1, dtype=torch.float64, device=device)
        # Reduced micro-batches: their shards' sums of squares and their weights, summed
        # over ranks, give each global micro-batch's gradient norm and item count.
        per_micro = []
        if self.every_micro_step:
            weights = torch.tensor(opt._weights, dtype=torch.float64, device=device)
            per_micro = [micro.to(device=device, dtype=torch.float64), weights]
        head = torch.cat(
            [
                torch.tensor([math.fsum(opt._weights)], dtype=torch.float64, device=device),
                local_sq,
                local_bad,
                touched.to(device),
                *per_micro,
                self._noise_sums(micro, fused_first, device),
                self._window_kind(device),
            ]
        )
        vector = torch.cat([head, _pack_batchnorm(self.batchnorms, device)])
        gathered = _gather(vector, self.group)
        summed = gathered[:, : head.numel()].sum(0)
        if replicated_sq is None:
            replicated_sq = torch.zeros((), dtype=torch.float64, device=device)
            replicated_bad = torch.zeros((), dtype=torch.bool, device=device)
        replicated_bad = cast(torch.Tensor, replicated_bad)  # reduce_accumulators: both or none
        n_bn = 2 * len(self.batchnorms)  # sample and gradient-sample counts
        bn_counts = gathered[:, head.numel() : head.numel() + n_bn].reshape(-1)
        # The one host sync of the window: totals, norms, flags and BatchNorm counts.
        fused = [t.to(device=device, dtype=torch.float64) for t in fused]
        host = torch.cat(
            [
                summed,
                replicated_sq.to(device=device, dtype=torch.float64).reshape(1),
                replicated_bad.to(device=device, dtype=torch.float64).reshape(1),
                bn_counts,
                *fused,
                micro.to(device=device, dtype=torch.float64),
            ]
        ).tolist()
        total, shard_sq, shard_bad = host[0], host[1], host[2]
        replicas = self.replicas  # HSDP: every shard counted once
        shard_sq /= replicas
        flags = host[3 : 3 + len(params)]
        at = 3 + len(params)
        m = len(opt._weights) if per_micro else 0
        micro_sums, micro_sizes = host[at : at + m], host[at + m : at + 2 * m]
        at += 2 * m
        self.pooled = host[at : at + 6] if not per_micro else None
        at += 6
        _check_window_kinds(host[at : at + 4], world=gathered.shape[0])
        at += 4
        rep_sq, rep_bad = host[at], host[at + 1]
        world = gathered.shape[0]
        counts = [host[at + 2 + r * n_bn : at + 2 + (r + 1) * n_bn] for r in range(world)]
        at += 2 + world * n_bn
        width = sum(t.numel() for t in fused)
        micro_host = host[at + width :]
        opt._touched = {id(p) for p, flag in zip(params, flags, strict=True) if flag > 0}
        _merge_batchnorm(self.batchnorms, gathered[:, head.numel() :], counts)
        self.micro_sizes = None
        if per_micro:
            # Each global micro-batch's mean-loss gradient: its reduced, item-weighted sum
            # (divided by FSDP2's factor) over its items.
            self.micro_sizes = micro_sizes
            factor = self.grad_factor
            micro_host = [
                sq / replicas * factor * factor / (n * n) if n > 0 else math.nan
                for sq, n in zip(micro_sums, micro_sizes, strict=True)
            ]
            return total, shard_sq, shard_bad != 0.0, micro_host, None
        if self.sharded:
            # Shards of window gradients say nothing about one micro-batch; the first
            # micro-batch's norm was read before FSDP2 reduced it.
            first = host[at] if fused else math.nan
            return total, shard_sq, shard_bad != 0.0, [], (shard_sq, first)
        replicated_fused = (host[at], host[at + 1]) if fused else None
        return total, rep_sq, rep_bad != 0.0, micro_host, replicated_fused


# --------------------------------------------------------------------------- DDP


class _HookState:
    """DDP's communication-hook state. DDP keeps its hook for the model's lifetime, so it
    reaches the wrapper's window weakly; once the wrapper is gone, buckets are averaged over
    the ranks as DDP does without a hook."""

    __slots__ = ("group", "window")

    def __init__(self, window: DDPWindow, group: Any) -> None:
        self.window = weakref.ref(window)
        self.group = group


def _window_comm_hook(state, bucket):  # no annotations: DDP compares them by identity
    window = state.window()
    if window is None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        return allreduce_hook(state.group, bucket)
    return window.comm_hook(bucket)


# model -> the window that drives it, so that a dropped wrapper's finalizer leaves the
# model alone once a newer wrapper has taken it over
_DRIVERS: weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


def _driven(model: torch.nn.Module) -> bool:
    ref = _DRIVERS.get(model)
    return ref is not None and ref() is not None


def _ddp_sync_on(model: torch.nn.parallel.DistributedDataParallel) -> None:
    """A dropped wrapper leaves DDP syncing every backward, as DDP does by default."""
    if not _driven(model):
        model.require_backward_grad_sync = True


def _fsdp_sync_on(model: torch.nn.Module, modules: list[Any]) -> None:
    """A dropped wrapper leaves FSDP2 reducing every backward, as it does by default, and
    discards the partial window that FSDP2 kept unsharded for it (the wrapper's
    accumulators, which held the rest of the window, are gone with it)."""
    if _driven(model):
        return
    for module in modules:
        module.set_requires_gradient_sync(True, recurse=False)
        for group in _fsdp_param_groups(module):
            for fsdp_param in group.fsdp_params:
                fsdp_param.unsharded_accumulated_grad = None
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    unsharded.grad = None


class DDPWindow(_DistributedWindow):
    """DDP: sync flag before the forward, one all-reduce per bucket per window."""

    model: torch.nn.parallel.DistributedDataParallel

    def __init__(
        self, opt: AccumulatingOptimizer, model: torch.nn.parallel.DistributedDataParallel
    ) -> None:
        super().__init__(opt, model, model.process_group)
        self.bucket_bytes = int(getattr(model, "bucket_bytes_cap", 25 * 2**20))
        self.find_unused = bool(model.find_unused_parameters)
        self.static_graph = bool(getattr(model, "static_graph", False))
        # Until DDP has run one synced backward, keep sync on (see the module docs).
        self.first_backward_synced = not self.static_graph or bool(
            getattr(model, "_static_graph_delay_allreduce_enqueued", False)
        )
        ours = [st for hook, st in getattr(model, "_comm_hooks", ()) if hook is _window_comm_hook]
        if ours:  # an earlier wrapper's hook: this window takes it over
            ours[0].window = weakref.ref(self)
        else:
            try:
                state = _HookState(self, model.process_group)
                model.register_comm_hook(state, _window_comm_hook)
            except RuntimeError as err:
                raise RuntimeError(
                    "fastaccum could not register its DDP communication hook (DDP takes one "
                    f"hook, and only before training starts): {err}. Wrap the optimizer right "
                    "after creating DistributedDataParallel and do not register another hook"
                ) from err
        weakref.finalize(self, _ddp_sync_on, model)
        self._prev_used: set[int] | None = None
        self._warned_unused = False
        self.start_window()

    def set_sync(self, on: bool) -> None:
        self.model.require_backward_grad_sync = bool(on or not self.first_backward_synced)

    def start_window(self) -> None:
        self._reduced: set[int] = set()
        self._sumsq: list[torch.Tensor] = []
        self._fused_sumsq: list[torch.Tensor] = []
        self._bad: list[torch.Tensor] = []
        self._boundary_backward = False  # the boundary ran under opt.backward with sync on
        self._prev_used = None

    def _reducible(self) -> list[torch.Tensor]:
        return [p for p in self.opt._params if p.requires_grad]

    def any_rank_holds(self, micro_steps: int) -> bool:
        # No collective runs inside a DDP window before its boundary, so the ranks may
        # hold different numbers of micro-batches (an uneven last window); one small
        # all-reduce says whether any holds one.
        count = torch.tensor([micro_steps], dtype=torch.float64, device=self.opt._params[0].device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.group)
        return bool(count.item() > 0)

    def _launch(self, params: list[torch.Tensor], result: Callable[[], Any]) -> Any:
        """All-reduce the accumulators of ``params`` as one flat fp32 buffer; a future that
        writes the sum back (with its norm and non-finite flag) and yields ``result()``."""
        opt = self.opt
        accums = [opt._accum_for(p) for p in params]
        flat = torch.cat([a.reshape(-1) for a in accums])
        torch._foreach_zero_(accums)
        self._reduced.update(id(p) for p in params)
        work = dist.all_reduce(flat, group=self.group, async_op=True)

        def write_back(fut: Any) -> Any:
            fut.value()  # re-raises a failed all-reduce into DDP / the waiter
            parts = flat.split([a.numel() for a in accums])
            views = [v.view(a.shape) for v, a in zip(parts, accums, strict=True)]
            # Fused-wgrad layers' accumulators apart (the same one read of each): the noise
            # scale needs their part of the window's norm.
            fused = opt._wgrad_param_ids()
            split: dict[bool, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
            for p, a, v in zip(params, accums, views, strict=True):
                pair = split.setdefault(id(p) in fused, ([], []))
                pair[0].append(a)
                pair[1].append(v)
            for is_fused, (targets, sums) in split.items():
                res = accumulate_unchecked(targets, sums, 1.0)
                self._sumsq.append(res.accum_sumsq)
                self._bad.append(res.found_nonfinite)
                if is_fused:
                    self._fused_sumsq.append(res.accum_sumsq)
            return result()

        return work.get_future().then(write_back)

    def comm_hook(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """DDP's bucket hook: on the boundary micro-batch under ``opt.backward``, reduce the
        bucket's accumulators; otherwise pass the bucket through without communication."""
        self.first_backward_synced = True
        opt = self.opt
        if opt._hook_weight is None or not opt._at_boundary():
            fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut
        opt._fold_pending()  # the hooks may still hold this bucket's last gradients
        buffer = bucket.buffer()
        return self._launch(list(bucket.parameters()), lambda: buffer)

    def before_backward(self) -> None:
        # DDP records in its forward whether that forward was synced.
        if not self.first_backward_synced and not self.model.require_forward_param_sync:
            raise RuntimeError(
                "DDP static_graph=True needs its first backward to be synced, but this "
                "micro-batch's forward ran without gradient sync (inside ddp.no_sync()?); "
                "DDP's reducer would fail in backward. fastaccum turns sync off inside "
                "windows itself: run the forward without no_sync()"
            )

    def after_backward(self) -> None:
        # The real gradients went into the accumulators; what DDP wrote into .grad is its
        # (zeroed or passed-through) bucket copy, so drop it.
        self._boundary_backward = self.opt._at_boundary() and self.model.require_backward_grad_sync
        for p in self.opt._params:
            p.grad = None

    def after_micro_step(self) -> None:
        if not self.find_unused or self._warned_unused:
            return
        used = set().union(*(ids for ids, _ in self.opt._covers))
        if self._prev_used is not None and used != self._prev_used:
            changed = next(iter(used ^ self._prev_used))
            self._warned_unused = True
            warnings.warn(
                "fastaccum: DDP find_unused_parameters=True and the parameters used vary "
                f"between micro-batches of a window ({self.opt._names[changed]} has a "
                "gradient on one micro-batch and not on another). Native no_sync "
                "accumulation would reduce only the gradients of parameters used on the "
                "window's last micro-batch; fastaccum reduces every parameter's whole-window "
                "accumulator, so this step is correct. Keep find_unused_parameters=True: "
                "without it DDP fails when the last micro-batch leaves a parameter unused",
                UserWarning,
                stacklevel=4,
            )
        self._prev_used = used

    def reduce_accumulators(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        missing = [p for p in self._reducible() if id(p) not in self._reduced]
        if missing and self._boundary_backward and not self.find_unused:
            # The ones without a gradient on the last micro-batch; DDP left the rest of
            # their buckets unreduced with them.
            used = set().union(*(ids for ids, _ in self.opt._covers))
            unused = [p for p in missing if id(p) not in used] or missing
            names = ", ".join(self.opt._names[id(p)] for p in unused[:3])
            warnings.warn(
                f"fastaccum: {len(unused)} parameter(s) ({names}) got no gradient on the "
                "window's last micro-batch while DDP has find_unused_parameters=False; "
                "fastaccum reduced them itself, but DDP will raise on its next synced "
                "backward. Create DistributedDataParallel(..., find_unused_parameters=True) "
                "when parameter usage varies",
                UserWarning,
                stacklevel=5,
            )
        futures = [self._launch(bucket, lambda: None) for bucket in self._buckets(missing)]
        for fut in futures:
            fut.wait()
        if not self._sumsq:
            return None, None
        device = self._sumsq[0].device
        bad = torch.stack([b.to(device) for b in self._bad]).any()
        return _sum64(self._sumsq), bad

    def reduced_fused_sq(self) -> torch.Tensor | None:
        return _sum64(self._fused_sumsq) if self._fused_sumsq else None

    def _buckets(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """DDP's bucketing rule: reverse parameter order (about the order backward produces
        gradients), a bucket closing once it holds ``bucket_bytes_cap`` bytes or more."""
        buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for p in reversed(params):
            buckets[-1].append(p)
            size += p.numel() * p.element_size()
            if size >= self.bucket_bytes:
                buckets.append([])
                size = 0
        return [b for b in buckets if b]


# --------------------------------------------------------------------------- FSDP2


def _fsdp_param_groups(module: FSDPModule) -> list[Any]:
    """The FSDP2 parameter groups of one ``fully_shard`` module: torch 2.13 keeps a list
    (``_fsdp_param_groups``), torch 2.11 one group or None (``_fsdp_param_group``)."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]


class FSDPWindow(_DistributedWindow):
    """FSDP2: ``set_requires_gradient_sync`` off the boundary (or reduce-scatter every
    micro-batch), fp32 shard accumulators, weights applied to the loss."""

    weights_in_loss = True
    sharded = True

    def __init__(
        self, opt: AccumulatingOptimizer, model: torch.nn.Module, every_micro_step: bool
    ) -> None:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        self.dtensor = DTensor
        params = opt._params
        plain = [opt._names[id(p)] for p in params if not isinstance(p, DTensor)]
        if plain:
            raise ValueError(
                f"parameter {plain[0]} is not sharded by fully_shard; with an FSDP2 model "
                "every optimized parameter must be an FSDP2 (DTensor) parameter"
            )
        dparams = cast("list[DTensor]", params)  # every one a DTensor (checked above)
        mesh = dparams[0].device_mesh
        if mesh.ndim not in (1, 2) or any(p.device_mesh != mesh for p in dparams):
            raise ValueError(
                "fastaccum supports FSDP2 over one 1-D device mesh (fully_shard) or one 2-D "
                f"(replicate, shard) mesh (HSDP); got a {mesh.ndim}-D mesh or several meshes"
            )
        group = mesh.get_group() if mesh.ndim == 1 else dist.group.WORLD
        if mesh.ndim == 2 and mesh.size() != dist.get_world_size():
            raise ValueError(
                f"HSDP over a {tuple(mesh.shape)} mesh of {mesh.size()} of the "
                f"{dist.get_world_size()} ranks: fastaccum exchanges each window's counts "
                "over all ranks, so the HSDP mesh must span them"
            )
        # HSDP: each shard is held by this many replicas, whose sums of squares are equal
        self.replicas = mesh.size(0) if mesh.ndim == 2 else 1
        if opt.master_weights:
            raise ValueError(
                "master_weights=True is not supported with FSDP2: FSDP2 keeps the sharded "
                "parameters in their own dtype; use MixedPrecisionPolicy(param_dtype=...) "
                "for low-precision compute"
            )
        super().__init__(opt, model, group)
        self.every_micro_step = bool(every_micro_step)
        self.modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        weakref.finalize(self, _fsdp_sync_on, model, self.modules)
        self.grad_factor = self._divide_factor(mesh.size())
        self._owners: dict[int, Any] = {}  # id(unsharded parameter) -> its FSDP2 parameter
        if not self.every_micro_step:
            self._check_unsharded_dtype()

    def _divide_factor(self, data_parallel: int) -> float:
        # FSDP2 divides the reduced gradient by its divide factor (the data-parallel size
        # unless set_gradient_divide_factor changed it); the wrapper multiplies it back.
        factors = {
            group.gradient_divide_factor
            for module in self.modules
            for group in _fsdp_param_groups(module)
        }
        factors.discard(None)
        if len(factors) > 1:
            raise ValueError(
                f"FSDP2 modules have different gradient divide factors {sorted(factors)}; "
                "fastaccum needs one (it normalizes by the global item count itself)"
            )
        return float(factors.pop()) if factors else float(data_parallel)

    def _check_unsharded_dtype(self) -> None:
        low = {torch.bfloat16, torch.float16}
        for module in self.modules:
            for group in _fsdp_param_groups(module):
                policy = group.mp_policy
                for fsdp_param in group.fsdp_params:
                    compute = policy.param_dtype or fsdp_param.sharded_param.dtype
                    kept = policy.reduce_dtype or compute
                    if kept in low:
                        warnings.warn(
                            "fastaccum: FSDP2 keeps the window's unsharded gradients in "
                            f"{kept} between micro-batches (set_requires_gradient_sync(False)); "
                            "set MixedPrecisionPolicy(reduce_dtype=torch.float32) for fp32 "
                            "accumulation, or wrap with reduce_scatter_every_micro_step=True",
                            UserWarning,
                            stacklevel=5,
                        )
                        return

    def set_sync(self, on: bool) -> None:
        for module in self.modules:
            module.set_requires_gradient_sync(bool(on or self.every_micro_step), recurse=False)

    def grads_expected(self, boundary: bool) -> bool:
        return self.every_micro_step or boundary

    def check_step(self, uses_num_items: bool) -> None:
        if uses_num_items:
            raise ValueError(
                "with an FSDP2 model, give num_items to opt.backward(loss, num_items=n), not "
                "to opt.step(): FSDP2 reduces or sums the gradients during backward, before "
                "step() could weight them"
            )

    def check_flush(self) -> None:
        if not self.every_micro_step:
            raise RuntimeError(
                "flush() cannot finish this partial window: FSDP2 holds its unsharded "
                "gradients and reduce-scatters them only in a backward with gradient sync "
                "on. Run the last micro-batch inside `with opt.accumulate(last=True):`, or "
                "wrap with reduce_scatter_every_micro_step=True"
            )

    def local(self, t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, self.dtensor) else t

    # ------------------------------------------------------------------ fused wgrad

    def _fsdp_params(self) -> Iterator[Any]:
        """Every FSDP2 parameter of the model's ``fully_shard`` modules."""
        for module in self.modules:
            for group in _fsdp_param_groups(module):
                yield from getattr(group, "fsdp_params", ())

    @staticmethod
    def _kept_grad(fsdp_param: Any) -> torch.Tensor | None:
        """The unsharded gradient FSDP2 keeps for ``fsdp_param`` between backwards:
        ``unsharded_accumulated_grad`` when it upcasts for the reduction, else the
        unsharded parameter's ``.grad`` (None: none yet)."""
        grad = getattr(fsdp_param, "unsharded_accumulated_grad", None)
        if grad is None:
            grad = getattr(getattr(fsdp_param, "_unsharded_param", None), "grad", None)
        return grad

    def _owner(self, t: torch.Tensor) -> Any | None:
        """The FSDP2 parameter whose unsharded parameter is ``t`` (the fused layers see
        those in forward and backward), or None."""
        owners = self._owners
        if id(t) not in owners:  # unsharded parameters exist once FSDP2 first ran
            owners.clear()
            for fsdp_param in self._fsdp_params():
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    owners[id(unsharded)] = fsdp_param
        return owners.get(id(t))

    def _fp32_window(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is an unsharded FSDP2 parameter whose window gradient FSDP2 keeps
        in fp32 (an fp32 parameter, or ``reduce_dtype=torch.float32``)."""
        owner = self._owner(t)
        if owner is None:
            return False
        reduce = getattr(owner, "reduce_dtype", None)
        return (reduce or t.dtype) == torch.float32

    def accepts_wgrad(self, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """With gradient sync off in the window (not reducing every micro-batch), fused
        layers whose parameters' window gradients FSDP2 keeps in fp32 add into those."""
        if self.every_micro_step or not weight.is_contiguous():
            return False
        trained = [weight] if bias is None or not bias.requires_grad else [weight, bias]
        return all(self._fp32_window(t) for t in trained)

    def window_grad(self, t: torch.Tensor) -> torch.Tensor:
        """Where a fused layer adds the gradient of ``t`` (an unsharded parameter that
        :meth:`accepts_wgrad` accepted): the fp32 unsharded gradient FSDP2 keeps for it
        through the window, made (zero) on the window's first write. That is FSDP2's
        ``unsharded_accumulated_grad`` when it upcasts for the reduction, else ``t.grad``.
        The loss already carries the micro-batch weight (its alpha is 1)."""
        owner = self._owner(t)
        grad = self._kept_grad(owner)
        if grad is not None:
            return grad
        if t.dtype != torch.float32:  # low-precision compute, fp32 reduction
            assert owner is not None  # t is an unsharded parameter (accepts_wgrad)
            owner.unsharded_accumulated_grad = grad = torch.zeros_like(t, dtype=torch.float32)
        else:
            t.grad = grad = torch.zeros_like(t)
        return grad

    def first_micro_sumsq(self) -> torch.Tensor | None:
        """With gradient sync off, FSDP2 keeps this rank's unsharded gradient of the
        window until the boundary: after the first micro-batch its squared norm is that
        micro-batch's (one read of it). None when FSDP2 reduces every micro-batch, or keeps
        no unsharded gradient where this reads it (``unsharded_accumulated_grad`` when it
        upcasts for the reduction, else the unsharded parameter's ``.grad``)."""
        if self.every_micro_step:
            return None
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for fsdp_param in self._fsdp_params():
            grad = self._kept_grad(fsdp_param)
            if isinstance(grad, torch.Tensor) and grad.numel():
                by_dtype.setdefault(grad.dtype, []).append(grad.contiguous())
        parts = [
            sumsq_unchecked(grads)
            for dtype, grads in by_dtype.items()
            if dtype in (torch.float32, torch.bfloat16, torch.float16)
        ]
        return _sum64(parts) if parts else None

    def as_grad(self, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sharded = cast("DTensor", target)  # FSDP2 parameters are DTensors
        return self.dtensor.from_local(
            t,
            sharded.device_mesh,
            sharded.placements,
            run_check=False,
            shape=target.shape,
            stride=target.stride(),
        )


# --------------------------------------------------------------------------- attach


def attach(
    opt: AccumulatingOptimizer,
    model: torch.nn.Module | None,
    reduce_scatter_every_micro_step: bool,
) -> _DistributedWindow | None:
    """The distributed driver for ``model`` (DDP or FSDP2), or None for a local model.

    Raises:
        ValueError: ``reduce_scatter_every_micro_step`` without an FSDP2 model, or an
            FSDP2 configuration fastaccum does not support.
        RuntimeError: DDP already has a communication hook.
        TypeError: a float64 or complex parameter under DDP or FSDP2.
    """
    found: _DistributedWindow | None = None
    if model is not None and dist.is_available():
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        if ddp or _has_fsdp(model):
            for p in opt._params:
                check_reducible(p, opt._names[id(p)])
            if ddp:  # isinstance of DistributedDataParallel, above
                found = DDPWindow(opt, cast(torch.nn.parallel.DistributedDataParallel, model))
            else:
                found = FSDPWindow(opt, model, reduce_scatter_every_micro_step)
    if reduce_scatter_every_micro_step and not isinstance(found, FSDPWindow):
        raise ValueError(
            "reduce_scatter_every_micro_step=True applies to FSDP2 models only; pass "
            "model= the fully_shard model"
        )
    # DTensor parameters exist only once torch.distributed.tensor was imported.
    dtensor = sys.modules.get("torch.distributed.tensor")
    if found is None and dtensor is not None:
        sharded = [p for p in opt._params if isinstance(p, dtensor.DTensor)]
        if sharded:
            message = (
                f"{opt._names[id(sharded[0])]} is a sharded (DTensor) parameter; pass the "
                "fully_shard model as model= so that fastaccum accumulates local shards"
            )
            if not opt._fused_update:
                raise ValueError(message)
            # A fused class may still join a list whose wrapper has the model: refuse at
            # its first micro-batch instead.
            opt._unusable = (
                message + ", or give this optimizer to fastaccum.wrap([...], K, model=...)"
            )
    return found


def warn_without_distributed_model(
    opt: AccumulatingOptimizer, model: torch.nn.Module | None, stacklevel: int
) -> None:
    """Warn when torch.distributed runs several ranks but the wrapper drives no DDP or
    FSDP2 model (called at its first micro-batch, after a Trainer took its DDP over)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    if not any(p.requires_grad for p in opt._params):
        return
    given = "no model=" if model is None else f"model= a {type(model).__name__}"
    warnings.warn(
        f"fastaccum: torch.distributed runs {dist.get_world_size()} ranks, but the wrapper "
        f"got {given}, not the DistributedDataParallel or fully_shard model, so it "
        "reduces no gradient across ranks itself and cannot weigh each rank's num_items: "
        "data-parallel ranks then drift apart. Pass the DDP/FSDP2 model itself "
        "(model=ddp, not ddp.module). If each rank trains its own model on purpose, "
        "silence this warning with warnings.filterwarnings",
        UserWarning,
        stacklevel=stacklevel,
    )


def check_reducible(p: torch.Tensor, name: str) -> None:
    """Raise TypeError for a float64 or complex parameter: the distributed windows reduce
    fp32 accumulators only."""
    if p.is_complex() or p.dtype == torch.float64:
        raise TypeError(
            f"{name} is {p.dtype}; under DDP and FSDP2 fastaccum accumulates float32, "
            "bfloat16 and float16 parameters only (float64 and complex ones train with "
            "fastaccum.wrap on a single process)"
        )


def _has_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())
