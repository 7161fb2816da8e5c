"""AccumBatchNorm under DDP on 2 gloo ranks: each rank's window stays its own until the
window's exchange merges it.

DDP broadcasts rank 0's buffers over the other ranks' at every forward after a synced
backward (``broadcast_buffers=True``, its default): a mid-window resume, ``static_graph=True``
(whose first micro-batch is synced) and ``mode="window"``'s gradient sums (kept across the
boundary) are where that copied rank 0's window over rank 1's. The references are a twin
run without DDP's buffer sync, the uninterrupted run, and ``nn.BatchNorm1d`` in float64 on
the global window batch.
"""

from __future__ import annotations

import copy
import inspect
import io
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import fastaccum
from tests.distributed.data import same_on_all_ranks
from tests.distributed.launch import by_name, scenario_test
from tests.helpers import assert_close_rel

K = 3
WINDOWS = 3


def bn_net(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    )


def micro(rank: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s micro-batch ``index``: 2 to 6 samples, sizes differing by rank."""
    gen = torch.Generator().manual_seed(1000 * rank + index)
    n = 2 + (rank * 7 + index * 3) % 5
    x = torch.randn(n, 5, generator=gen) * 2 + 0.5
    return x, torch.randint(0, 3, (n,), generator=gen)


def step(ddp: torch.nn.Module, opt, rank: int, index: int) -> None:
    x, y = micro(rank, index)
    opt.backward(F.cross_entropy(ddp(x), y), num_items=len(y))
    opt.step()


def ddp_without_buffer_sync(model: torch.nn.Module) -> DDP:
    """DDP that broadcasts no buffers at forward (``forward_sync_buffers`` since torch
    2.13, ``broadcast_buffers`` before)."""
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(model, forward_sync_buffers=False)
    return DDP(model, broadcast_buffers=False)


def snapshot(model: torch.nn.Module) -> torch.Tensor:
    """Parameters and buffers (running statistics included), flat, in float64."""
    return torch.cat([t.detach().double().flatten() for t in model.state_dict().values()])


def build(mode: str, seed: int = 0, make_ddp: Callable[[torch.nn.Module], DDP] = DDP, **ddp_kwargs):
    model = fastaccum.convert_batchnorm(bn_net(seed), mode=mode)
    ddp = make_ddp(model, **ddp_kwargs)
    opt = fastaccum.wrap(torch.optim.SGD(ddp.parameters(), lr=0.1), K, model=ddp)
    return model, ddp, opt


def window_mode_equals_ddp_without_buffer_sync(rank: int, world: int) -> None:
    """mode="window": DDP as the README shows it trains bit for bit as DDP without buffer
    sync, and rank 1's previous-window gradient sums are still its own after the forward
    that follows a boundary (DDP's broadcast replaced them with rank 0's)."""
    runs = []
    for make_ddp in (DDP, ddp_without_buffer_sync):
        model, ddp, opt = build("window", make_ddp=make_ddp)
        for i in range(K * WINDOWS):
            step(ddp, opt, rank, i)
        runs.append(snapshot(model))
    assert torch.equal(runs[0], runs[1])

    model, ddp, opt = build("window")
    for i in range(K):
        step(ddp, opt, rank, i)
    before = model[1].prev_grad.clone()
    with torch.no_grad():
        ddp(micro(rank, K)[0])  # the first forward after a synced backward
    assert torch.equal(model[1].prev_grad, before)


def mid_window_resume_is_exact(rank: int, world: int) -> None:
    """Each rank saves its own state dict two micro-batches into the second window and
    resumes in a fresh model, DDP and wrapper: running statistics and parameters equal the
    uninterrupted run's bit for bit, in every mode (the first forward after the resume is
    a synced one, whose buffer broadcast overwrote rank 1's window)."""
    for mode in ("merged", "renorm", "window"):
        model, ddp, opt = build(mode)
        for i in range(K * WINDOWS):
            step(ddp, opt, rank, i)
        want = snapshot(model)

        model, ddp, opt = build(mode)
        for i in range(K + 2):
            step(ddp, opt, rank, i)
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
        model, ddp, opt = build(mode, seed=99)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        for i in range(K + 2, K * WINDOWS):
            step(ddp, opt, rank, i)
        assert torch.equal(snapshot(model), want), mode


def assert_running_stats_of_global_batch(rank: int, world: int, model, ddp, opt) -> None:
    """Train WINDOWS windows; after each, the running statistics equal nn.BatchNorm1d's in
    float64 after the same windows, each fed as one batch: every rank's micro-batches
    through the first Linear as it was during that window."""
    ref = torch.nn.BatchNorm1d(6).double()
    bn = model[1]
    for w in range(WINDOWS):
        linear = copy.deepcopy(model[0])
        for i in range(w * K, (w + 1) * K):
            step(ddp, opt, rank, i)
        window = [micro(r, i)[0] for r in range(world) for i in range(w * K, (w + 1) * K)]
        with torch.no_grad():
            ref(torch.cat([linear(x) for x in window]).double())
        assert int(bn.num_batches_tracked) == w + 1
        assert_close_rel(bn.running_mean, ref.running_mean, 1e-6)
        assert_close_rel(bn.running_var, ref.running_var, 1e-6)
        assert same_on_all_ranks(bn.running_mean) and same_on_all_ranks(bn.running_var)


def static_graph_running_stats(rank: int, world: int) -> None:
    """DDP(static_graph=True) syncs the very first micro-batch, so the second forward
    broadcast rank 0's half-filled window: running statistics were 0.05 off."""
    for mode in ("merged", "window"):
        model, ddp, opt = build(mode, static_graph=True)
        assert_running_stats_of_global_batch(rank, world, model, ddp, opt)


def converted_sync_batchnorm_merges_across_ranks(rank: int, world: int) -> None:
    """nn.SyncBatchNorm converted by convert_batchnorm: its window statistics are merged
    across the ranks at each boundary, as nn.BatchNorm's conversions are (and DDP takes the
    CPU model, which it refuses with SyncBatchNorm in it)."""
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(bn_net())
    fastaccum.convert_batchnorm(model, mode="window")
    ddp = DDP(model)
    opt = fastaccum.wrap(torch.optim.SGD(ddp.parameters(), lr=0.1), K, model=ddp)
    assert_running_stats_of_global_batch(rank, world, model, ddp, opt)


def boundary_state_is_the_same_on_every_rank(rank: int, world: int) -> None:
    """mode="window" keeps the previous window's gradient sums for the next window's
    backward. At a boundary every rank's opt.state_dict() must be the same (the README lets
    rank 0 save it), and a run resumed on every rank from rank 0's equals the uninterrupted
    one bit for bit."""
    model, ddp, opt = build("window")
    for i in range(K * WINDOWS):
        step(ddp, opt, rank, i)
    want = snapshot(model)

    model, ddp, opt = build("window")
    for i in range(K):
        step(ddp, opt, rank, i)
    state = opt.state_dict()["fastaccum"]["batchnorm"]
    states: list = [None] * world
    dist.all_gather_object(states, state)
    for key, value in states[0][0].items():
        other = states[1][0][key]
        same = torch.equal(value, other) if torch.is_tensor(value) else value == other
        assert same, f"{key} differs between ranks at a boundary"
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    blob = [buf.getvalue()]
    dist.broadcast_object_list(blob, src=0)
    saved = torch.load(io.BytesIO(blob[0]), weights_only=False)
    model, ddp, opt = build("window", seed=99)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    for i in range(K, K * WINDOWS):
        step(ddp, opt, rank, i)
    assert torch.equal(snapshot(model), want)


SCENARIOS = by_name(
    window_mode_equals_ddp_without_buffer_sync,
    mid_window_resume_is_exact,
    static_graph_running_stats,
    converted_sync_batchnorm_merges_across_ranks,
    boundary_state_is_the_same_on_every_rank,
)


test_batchnorm_buffers = scenario_test(SCENARIOS)
