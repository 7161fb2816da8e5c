"""Per-rank data and single-process references for the distributed tests."""

from __future__ import annotations

import torch
import torch.distributed as dist

K = 4
WINDOWS = 3


def rank_batches(rank: int, n_micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank ``rank``'s token micro-batches. Rank 1's are 2 to 3 times longer than rank 0's,
    so the ranks carry uneven item counts in every window."""
    gen = torch.Generator().manual_seed(100 + rank)
    low, high = (3, 20) if rank == 0 else (20, 60)
    batches = []
    for _ in range(n_micro):
        n = int(torch.randint(low, high, (1,), generator=gen))
        x = torch.randint(0, 23, (n,), generator=gen)
        batches.append((x, torch.randint(0, 23, (n,), generator=gen)))
    return batches


def global_windows(world: int, n_micro: int, k: int = K) -> list[list]:
    """The single-process view: window w holds every rank's micro-batches of window w (the
    last window may be partial)."""
    sizes = [min(k, n_micro - start) for start in range(0, n_micro, k)]
    return windows_of_sizes(world, sizes)


def windows_of_sizes(world: int, sizes: list[int]) -> list[list]:
    """The single-process view of windows of ``sizes`` micro-batches per rank (a batch-size
    schedule): window w holds every rank's micro-batches of window w."""
    per_rank = [rank_batches(r, sum(sizes)) for r in range(world)]
    windows, start = [], 0
    for k in sizes:
        windows.append([b for r in range(world) for b in per_rank[r][start : start + k]])
        start += k
    return windows


def weighted_reference(model, opt, windows, loss_fn, max_grad_norm=None) -> None:
    """Plain torch, one backward per window on sum_i n_i loss_i / sum_i n_i over all
    micro-batches of all ranks (the mean over every item of the window), then clip and
    step. ``loss_fn(model, entry)`` gives a window entry's mean loss and item count."""
    for window in windows:
        pairs = [loss_fn(model, entry) for entry in window]
        total = sum(n for _, n in pairs)
        sum(loss * (n / total) for loss, n in pairs).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        opt.zero_grad()


def same_on_all_ranks(t: torch.Tensor) -> bool:
    """Whether every rank holds bitwise the same tensor."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(parts[0], p) for p in parts)


def micro_gradients(model: torch.nn.Module, window: list, loss_fn) -> tuple[list, list[float]]:
    """This rank's gradient of ``loss_fn(model, x, y)`` (the mean over a micro-batch's
    items) for each micro-batch of ``window``, and the item counts."""
    grads = [torch.autograd.grad(loss_fn(model, x, y), list(model.parameters())) for x, y in window]
    return grads, [float(len(y)) for _, y in window]


def global_mean(grads: list, sizes: list[float]) -> tuple[list[torch.Tensor], float]:
    """The item-weighted mean of ``grads`` over every rank's micro-batches (all-reduced),
    and the item count behind it."""
    summed = [
        sum(n * g[i] for n, g in zip(sizes, grads, strict=True)) for i in range(len(grads[0]))
    ]
    total = torch.tensor(sum(sizes), dtype=torch.float64)
    for t in [*summed, total]:
        dist.all_reduce(t)
    return [t / total for t in summed], float(total)


def sq(tensors) -> float:
    """Squared L2 norm over ``tensors``."""
    return float(sum(t.square().sum() for t in tensors))
