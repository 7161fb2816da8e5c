"""fastaccum.wrap(opt, K, model=DistributedDataParallel(...)) on 2 gloo ranks.

Each rank feeds its own token micro-batches (rank 1's are 2-3x longer: uneven item counts).
The reference is one process training on the concatenated batches of both ranks (one
backward per window over every item), as in tests/optim. Collective calls are counted by
passing torch.distributed.all_reduce / all_gather through a counter; DDP's own bucket
layout comes from its logging data.
"""

from __future__ import annotations

import copy
import io
import warnings
import weakref

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fastaccum
import fastaccum.optim as fo
from fastaccum.distributed import merge_batchnorm_windows
from tests.distributed.data import (
    WINDOWS,
    K,
    global_mean,
    global_windows,
    micro_gradients,
    rank_batches,
    same_on_all_ranks,
    sq,
    weighted_reference,
    windows_of_sizes,
)
from tests.distributed.launch import by_name, scenario_test
from tests.helpers import (
    VOCAB,
    assert_close_rel,
    collector_off,
    large_batch_run,
    make_model,
    mean_loss,
    members_of,
    sgd_adamw,
)

SMALL_BUCKETS_MB = 0.001  # splits the test model into 3 DDP buckets


class CollectiveCounter:
    """Records the numel of every torch.distributed.all_reduce / all_gather call and
    passes each call on unchanged."""

    def __enter__(self) -> CollectiveCounter:
        self.all_reduce: list[int] = []
        self.all_gather: list[int] = []
        self._saved = (dist.all_reduce, dist.all_gather)
        real_reduce, real_gather = self._saved

        def all_reduce(tensor, *args, **kwargs):
            self.all_reduce.append(tensor.numel())
            return real_reduce(tensor, *args, **kwargs)

        def all_gather(tensors, tensor, *args, **kwargs):
            self.all_gather.append(tensor.numel())
            return real_gather(tensors, tensor, *args, **kwargs)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather
        return self

    def reset(self) -> None:
        self.all_reduce.clear()
        self.all_gather.clear()

    def __exit__(self, *exc: object) -> None:
        dist.all_reduce, dist.all_gather = self._saved


def ddp_bucket_numels(ddp: DDP) -> list[int]:
    """DDP's current bucket sizes in fp32 elements (rebuilt after its first synced step)."""
    data = ddp._get_ddp_logging_data()
    sizes = data.get("rebuilt_bucket_sizes") or data["bucket_sizes"]
    return sorted(int(s) // 4 for s in str(sizes).split(","))


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)


def assert_matches(model: torch.nn.Module, want: torch.nn.Module) -> None:
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)
        assert same_on_all_ranks(p.detach())


# --------------------------------------------------------------------------- scenarios


def opt_backward_one_allreduce_per_bucket(rank: int, world: int) -> None:
    """opt.backward path, AdamW with clipping: the sync flag is off before every
    non-boundary forward, the boundary backward all-reduces each DDP bucket once (inside
    backward, through the comm hook), one all-gather carries the counts, and training equals
    the large-batch run."""
    n = K * WINDOWS
    want, _ = large_batch_run(adamw, global_windows(world, n), max_grad_norm=0.5)
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=SMALL_BUCKETS_MB)
    opt = fastaccum.wrap(adamw(ddp.parameters()), K, model=ddp, max_grad_norm=0.5)
    numel = sum(p.numel() for p in model.parameters())
    norms = []
    with CollectiveCounter() as calls:
        for i, (x, y) in enumerate(rank_batches(rank, n)):
            boundary = (i + 1) % K == 0
            assert ddp.require_backward_grad_sync == boundary, f"sync flag before forward {i}"
            calls.reset()
            opt.backward(mean_loss(ddp, x, y), num_items=len(y))
            in_backward = sorted(calls.all_reduce)
            assert opt.step() == boundary
            if not boundary:
                assert calls.all_reduce == [] and calls.all_gather == [], f"micro-batch {i}"
                continue
            buckets = ddp_bucket_numels(ddp)
            assert in_backward == buckets, f"window {i // K}: {in_backward} vs DDP {buckets}"
            assert sorted(calls.all_reduce) == buckets  # none left for step()
            assert sum(buckets) == numel
            assert len(calls.all_gather) == 1
            norms.append(opt.stats()["grad_norm"])
    assert len(ddp_bucket_numels(ddp)) == 3
    assert max(norms) > 0.5  # clipping was active, so the norm is the global one
    assert_matches(model, want)
    items = sum(len(y) for w in global_windows(world, n) for _, y in w)
    assert opt.stats()["items_seen"] == items


def step_path_and_flush(rank: int, world: int) -> None:
    """loss.backward(); opt.step(num_items=n): exact too, the reduction runs at step() (one
    all-reduce per bucket of DDP's size); flush() of a partial last window reduces it.
    With gradient_as_bucket_view=True, .grad is a view of DDP's bucket at the boundary."""
    n = K * WINDOWS + 2
    want, _ = large_batch_run(sgd, global_windows(world, n))
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=SMALL_BUCKETS_MB, gradient_as_bucket_view=True)
    opt = fastaccum.wrap(sgd(ddp.parameters()), K, model=ddp)
    per_window = []
    with CollectiveCounter() as calls:
        for x, y in rank_batches(rank, n):
            mean_loss(ddp, x, y).backward()
            in_backward = list(calls.all_reduce)
            assert in_backward == []  # the hook passes buckets through: weight unknown yet
            if opt.step(num_items=len(y)):
                per_window.append(sorted(calls.all_reduce))
            calls.reset()
        assert opt.micro_step == 2
        assert opt.flush() is True
        per_window.append(sorted(calls.all_reduce))
    buckets = ddp_bucket_numels(ddp)
    # flush() first asks whether any rank holds a micro-batch: one 1-element all-reduce
    expected = [buckets] * WINDOWS + [sorted([1, *buckets])]
    assert per_window == expected, f"{per_window} vs DDP {buckets}"
    assert_matches(model, want)


def flush_with_an_empty_rank(rank: int, world: int) -> None:
    """An uneven last window in which rank 0 holds no micro-batch and the others one:
    flush() on every rank joins rank 0 to the boundary (it deadlocked before), all ranks
    step on what the window held, and an all-empty window then returns False everywhere.
    Both backward paths, against the large batch."""
    n = K * WINDOWS
    extra = rank_batches(rank, n + 1)[n:] if rank > 0 else []
    last = [b for r in range(1, world) for b in rank_batches(r, n + 1)[n:]]
    want, _ = large_batch_run(sgd, [*global_windows(world, n), last])
    for opt_backward in (True, False):
        model = make_model()
        ddp = DDP(model, bucket_cap_mb=SMALL_BUCKETS_MB)
        opt = fastaccum.wrap(sgd(ddp.parameters()), K, model=ddp)
        for x, y in rank_batches(rank, n) + extra:
            if opt_backward:
                opt.backward(mean_loss(ddp, x, y), num_items=len(y))
                opt.step()
            else:
                mean_loss(ddp, x, y).backward()
                opt.step(num_items=len(y))
                opt.zero_grad()
        assert opt.micro_step == len(extra)
        assert opt.flush() is True
        assert opt.flush() is False  # every rank's window is empty now
        assert opt.stats()["windows"] == WINDOWS + 1
        assert_matches(model, want)


def wrap_without_the_ddp_model_warns(rank: int, world: int) -> None:
    """Under torch.distributed, a wrapper without the DDP model (model= left out, or given
    the inner module) warns at its first micro-batch, pointing at the user's line, that
    nothing is reduced across ranks; with model=ddp it does not."""
    model = make_model()
    ddp = DDP(model)
    x, y = rank_batches(rank, 1)[0]
    for given in ({}, {"model": ddp.module}):
        opt = fastaccum.wrap(sgd(model.parameters()), K, **given)
        mean_loss(model, x, y).backward()
        with pytest.warns(UserWarning, match=r"not the DistributedDataParallel.*model=ddp") as got:
            opt.step()
        assert got[0].filename == __file__
        opt.zero_grad()
        mean_loss(model, x, y).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()  # once
        opt.zero_grad()
    opt = fastaccum.wrap(sgd(ddp.parameters()), K, model=ddp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.backward(mean_loss(ddp, x, y), num_items=len(y))
        opt.step()


def ranks_that_feed_a_window_differently(rank: int, world: int) -> None:
    """num_items on rank 0 only, or opt.backward on rank 0 and loss.backward(); opt.step()
    on the others: every rank raises at the boundary, with the window discarded and the
    parameters and optimizer state untouched (they trained apart without a word before);
    the next window, fed alike, trains exactly as the large batch of that window. (Mixed
    paths reduce at different times; with one DDP bucket the reductions still pair up
    and the boundary check sees the mix, with several the collective itself fails.)"""
    from fastaccum.distributed import RanksDisagreeError

    batches = rank_batches(rank, 2 * K)
    want, _ = large_batch_run(sgd, global_windows(world, 2 * K)[1:])
    for mix in ("num_items", "path"):
        model = make_model()
        start = [p.detach().clone() for p in model.parameters()]
        ddp = DDP(model)
        inner = sgd(ddp.parameters())
        opt = fastaccum.wrap(inner, K, model=ddp)
        with pytest.raises(RanksDisagreeError, match="discarded on every rank") as err:
            for x, y in batches[:K]:
                if mix == "path" and rank > 0:
                    mean_loss(ddp, x, y).backward()
                    opt.step(num_items=len(y))
                    opt.zero_grad()
                else:
                    items = len(y) if mix == "path" or rank == 0 else None
                    opt.backward(mean_loss(ddp, x, y), num_items=items)
                    opt.step()
        assert ("num_items was given" in str(err.value)) == (mix == "num_items")
        assert ("same path" in str(err.value)) == (mix == "path")
        assert opt.micro_step == 0
        assert not inner.state or all(not s for s in inner.state.values())
        for p, q in zip(model.parameters(), start, strict=True):
            assert torch.equal(p.detach(), q)
        ddp.zero_grad(set_to_none=True)
        for x, y in batches[K:]:
            opt.backward(mean_loss(ddp, x, y), num_items=len(y))
            opt.step()
        assert_matches(model, want)


def fused_wgrad_and_fused_adamw(rank: int, world: int) -> None:
    """fuse_wgrad layers (no .grad at all) with the fused AdamW class under DDP."""
    n = K * WINDOWS
    want, _ = large_batch_run(
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), global_windows(world, n)
    )
    model = fastaccum.fuse_wgrad(make_model())
    ddp = DDP(model)
    opt = fo.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1, accum_steps=K, model=ddp)
    for x, y in rank_batches(rank, n):
        opt.backward(mean_loss(ddp, x, y), num_items=len(y))
        opt.step()
    assert_matches(model, want)


def static_graph(rank: int, world: int) -> None:
    """DDP(static_graph=True): its first backward is kept synced (the hook passes it
    through), which DDP requires; training is exact. A first forward run under the user's
    own no_sync() is refused by opt.backward before DDP's reducer would fail."""
    n = K * WINDOWS
    want, _ = large_batch_run(sgd, global_windows(world, n))
    model = make_model()
    ddp = DDP(model, static_graph=True)
    opt = fastaccum.wrap(sgd(ddp.parameters()), K, model=ddp)
    assert ddp.require_backward_grad_sync  # first micro-batch: synced for static_graph
    for x, y in rank_batches(rank, n):
        opt.backward(mean_loss(ddp, x, y), num_items=len(y))
        opt.step()
    assert_matches(model, want)

    model = make_model()
    ddp = DDP(model, static_graph=True)
    opt = fastaccum.wrap(sgd(ddp.parameters()), K, model=ddp)
    batches = rank_batches(rank, K)
    with ddp.no_sync():
        loss = mean_loss(ddp, *batches[0])
    with pytest.raises(RuntimeError, match="static_graph=True needs its first backward"):
        opt.backward(loss, num_items=len(batches[0][1]))
    assert opt.micro_step == 0 and all(p.grad is None for p in model.parameters())
    for x, y in batches:  # nothing was changed: the window trains as usual
        opt.backward(mean_loss(ddp, x, y), num_items=len(y))
        opt.step()
    want, _ = large_batch_run(sgd, global_windows(world, K))
    assert_matches(model, want)


class Branchy(torch.nn.Module):
    """The token model with an extra residual layer that only some micro-batches use."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_model()
        torch.manual_seed(7)
        self.aux = torch.nn.Linear(VOCAB, VOCAB)

    def forward(self, x: torch.Tensor, use_aux: bool) -> torch.Tensor:
        h = self.body(x)
        return h + self.aux(h) if use_aux else h


def uses_aux(rank: int, index: int) -> bool:
    # Varies within each window and differs between ranks; the window's last micro-batch
    # never uses it, which is where native no_sync accumulation loses its gradient.
    return index % K == (1 if rank == 0 else 2)


def branchy_loss(model, entry):
    (x, y), rank, index = entry
    return torch.nn.functional.cross_entropy(model(x, uses_aux(rank, index)), y), len(y)


def find_unused_with_varying_usage(rank: int, world: int) -> None:
    """find_unused_parameters=True with usage varying inside windows: warned once, and every
    parameter's whole-window gradient is reduced (aux is unused on every boundary)."""
    n = K * WINDOWS
    ref = Branchy()
    ref_opt = sgd(ref.parameters())
    streams = [rank_batches(r, n) for r in range(world)]
    windows = [
        [(streams[r][i], r, i) for r in range(world) for i in range(w * K, (w + 1) * K)]
        for w in range(WINDOWS)
    ]
    weighted_reference(ref, ref_opt, windows, branchy_loss)
    model = Branchy()
    ddp = DDP(model, find_unused_parameters=True)
    opt = fastaccum.wrap(sgd(ddp.parameters()), K, model=ddp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, batch in enumerate(streams[rank]):
            loss, items = branchy_loss(ddp, (batch, rank, i))
            opt.backward(loss, num_items=items)
            opt.step()
    messages = [str(w.message) for w in caught if "find_unused_parameters=True" in str(w.message)]
    assert len(messages) == 1, messages
    assert_matches(model, ref)


def unused_at_boundary_without_find_unused(rank: int, world: int) -> None:
    """find_unused_parameters=False and a parameter unused on the boundary micro-batch:
    the window is still reduced exactly, and a warning names the unused parameters (not
    the others of their DDP bucket) and the fix before DDP fails."""
    streams = [rank_batches(r, K) for r in range(world)]
    windows = [[(streams[r][i], r, i) for r in range(world) for i in range(K)]]
    ref = Branchy()
    ref_opt = sgd(ref.parameters())
    weighted_reference(ref, ref_opt, windows, branchy_loss)
    model = Branchy()
    ddp = DDP(model)
    opt = fastaccum.wrap(sgd(ddp.parameters()), K, model=ddp)
    with pytest.warns(UserWarning, match="find_unused_parameters=True") as caught:
        for i, batch in enumerate(streams[rank]):
            loss, items = branchy_loss(ddp, (batch, rank, i))
            opt.backward(loss, num_items=items)
            opt.step()
    message = next(str(w.message) for w in caught if "find_unused" in str(w.message))
    assert "2 parameter(s) (module.aux.weight, module.aux.bias) got no gradient" in message
    assert_matches(model, ref)


def nonfinite_skips_on_every_rank(rank: int, world: int) -> None:
    """A NaN on one rank's micro-batch under a GradScaler: every rank skips that window and
    backs the scale off (decisions come from the reduced gradient); the next window trains,
    unscaled once, like the large-batch run on that window alone."""
    windows = global_windows(world, 2 * K)
    want, _ = large_batch_run(sgd, windows[1:], max_grad_norm=1.0)
    model = make_model()
    ddp = DDP(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    opt = fastaccum.wrap(sgd(ddp.parameters()), K, model=ddp, max_grad_norm=1.0, scaler=scaler)
    stepped = []
    for i, (x, y) in enumerate(rank_batches(rank, 2 * K)):
        loss = mean_loss(ddp, x, y)
        if rank == 1 and i == 1:
            loss = loss * float("nan")
        opt.backward(scaler.scale(loss), num_items=len(y))
        stepped.append(opt.step())
        if i == K - 1:
            assert scaler.get_scale() == 512.0  # backed off once, on every rank
    assert stepped == [False] * (2 * K - 1) + [True]
    assert opt.stats()["skipped_windows"] == 1 and opt.stats()["windows"] == 1
    assert_matches(model, want)


def batchnorm_merged_across_ranks(rank: int, world: int) -> None:
    """AccumBatchNorm (merged): running statistics after each window equal nn.BatchNorm1d's
    on the concatenation of every rank's micro-batches of that window."""
    torch.manual_seed(3)
    ref = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6))
    model = fastaccum.convert_batchnorm(copy.deepcopy(ref))
    ddp = DDP(model)
    opt = fastaccum.wrap(torch.optim.SGD(ddp.parameters(), lr=0.0), K, model=ddp)

    def micro(r: int, i: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 * r + i)
        size = 2 + r * 5 + i % 3  # rank 1's micro-batches are larger
        return 40.0 + 3.0 * torch.randn(size, 5, generator=gen)  # a large mean

    bn = model[1]
    for w in range(WINDOWS):
        for i in range(w * K, (w + 1) * K):
            opt.backward(ddp(micro(rank, i)).square().mean())
            opt.step()
        ref(torch.cat([micro(r, i) for r in range(world) for i in range(w * K, (w + 1) * K)]))
        assert_close_rel(bn.running_mean, ref[1].running_mean, 1e-6)
        assert_close_rel(bn.running_var, ref[1].running_var, 1e-5)
        assert bn.window_count == 0  # merged, folded and reset
    assert int(bn.num_batches_tracked) == WINDOWS

    # By hand, without the wrapper: forwards, then merge_batchnorm_windows.
    with torch.no_grad():
        for i in (100, 101):
            model(micro(rank, i))
        merge_batchnorm_windows(model)
        h = model[0](torch.cat([micro(r, i) for r in range(world) for i in (100, 101)]))
    h = h.double()
    assert bn.window_count == h.shape[0]
    assert_close_rel(bn.window_mean, h.mean(0), 1e-6)
    assert_close_rel(bn.window_m2, (h - h.mean(0)).square().sum(0), 1e-5)


def accumulate_context_and_partial_window(rank: int, world: int) -> None:
    """``with opt.accumulate(last=True):`` closes a partial window with the same overlapped
    per-bucket reduction as a full one; the context sets the sync flag on entry."""
    n = K + 2
    want, _ = large_batch_run(adamw, global_windows(world, n))
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=SMALL_BUCKETS_MB)
    opt = fastaccum.wrap(adamw(ddp.parameters()), K, model=ddp)
    stepped = []
    with CollectiveCounter() as calls:
        for i, (x, y) in enumerate(rank_batches(rank, n)):
            last = i == n - 1
            ddp.require_backward_grad_sync = not ddp.require_backward_grad_sync  # scramble
            with opt.accumulate(last=last):
                assert ddp.require_backward_grad_sync == ((i + 1) % K == 0 or last)
                opt.backward(mean_loss(ddp, x, y), num_items=len(y))
            if last:
                assert sorted(calls.all_reduce) == ddp_bucket_numels(ddp)
            stepped.append(opt.step())
            calls.reset()
    assert stepped == [False, False, False, True, False, True]
    assert_matches(model, want)


def dropped_wrapper_leaves_plain_ddp(rank: int, world: int) -> None:
    """Dropping the wrapper mid-window (sync off) frees it at once, turns DDP's sync back
    on and leaves its hook averaging buckets as DDP does alone: plain DDP training then
    matches a fresh DDP model trained from the same weights, on every rank. A new wrapper
    then takes the model and its hook over and trains a window as the large batch."""
    plain_steps = 3
    n = K + 1 + plain_steps + K
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=SMALL_BUCKETS_MB)
    opt = fastaccum.wrap(sgd(ddp.parameters()), K, model=ddp)
    batches = rank_batches(rank, n)
    for x, y in batches[: K + 1]:  # one window, then one micro-batch of the next
        opt.backward(mean_loss(ddp, x, y), num_items=len(y))
        opt.step()
    assert not ddp.require_backward_grad_sync
    ref = weakref.ref(opt)
    with collector_off():  # freed by reference counting: nothing the model keeps holds it
        del opt
        assert ref() is None
    assert ddp.require_backward_grad_sync

    fresh = copy.deepcopy(model)
    fresh_ddp = DDP(fresh, bucket_cap_mb=SMALL_BUCKETS_MB)
    plain_batches = batches[K + 1 : K + 1 + plain_steps]
    for net, wrapped in ((model, ddp), (fresh, fresh_ddp)):
        plain = torch.optim.SGD(net.parameters(), lr=0.1)
        for x, y in plain_batches:
            mean_loss(wrapped, x, y).backward()
            plain.step()
            plain.zero_grad()
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert_close_rel(p, q, 1e-6)
        assert same_on_all_ranks(p.detach())

    # the reference: every rank's last window, one weighted backward in one process
    want = copy.deepcopy(model)
    per_rank = [rank_batches(r, n)[n - K :] for r in range(world)]
    window = [b for r in range(world) for b in per_rank[r]]
    weighted_reference(
        want, sgd(want.parameters()), [window], lambda m, b: (mean_loss(m, *b), len(b[1]))
    )
    opt = fastaccum.wrap(sgd(ddp.parameters()), K, model=ddp)
    for x, y in batches[n - K :]:
        opt.backward(mean_loss(ddp, x, y), num_items=len(y))
        opt.step()
    assert_matches(model, want)


def mid_window_resume_per_rank(rank: int, world: int) -> None:
    """Each rank saves its own state dict two micro-batches into the second window (its
    accumulators hold only its own micro-batches then), and a fresh DDP model and wrapper
    loaded from them continue exactly: training equals the large-batch run."""
    n = K * WINDOWS
    want, _ = large_batch_run(adamw, global_windows(world, n), max_grad_norm=0.5)

    def build(seed: int, model_state=None, opt_state=None):
        model = make_model(seed)
        if model_state is not None:
            model.load_state_dict(model_state)
        ddp = DDP(model, bucket_cap_mb=SMALL_BUCKETS_MB)
        opt = fastaccum.wrap(adamw(ddp.parameters()), K, model=ddp, max_grad_norm=0.5)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        return model, ddp, opt

    model, ddp, opt = build(0)
    for i, (x, y) in enumerate(rank_batches(rank, n)):
        if i == K + 2:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf)
            model, ddp, opt = build(99, saved["model"], saved["opt"])
            assert opt.micro_step == 2 and not ddp.require_backward_grad_sync
        opt.backward(mean_loss(ddp, x, y), num_items=len(y))
        opt.step()
    assert_matches(model, want)


def accum_steps_schedule(rank: int, world: int) -> None:
    """``opt.accum_steps`` changed at boundaries and mid-window: the sync flag follows the
    new K before every forward, each window all-reduces once, per bucket, and training
    equals the large-batch run with windows of the scheduled sizes."""
    # K=2; K=4, raised to 5 two micro-batches in; K=1; K=8, cut to 2 one micro-batch in.
    # The last two changes make the very next micro-batch close its window.
    sizes = [2, 5, 1, 2]
    changes = {2: 4, 4: 5, 7: 1, 8: 8, 9: 2}
    want, _ = large_batch_run(adamw, windows_of_sizes(world, sizes), max_grad_norm=0.5)
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=SMALL_BUCKETS_MB)
    opt = fastaccum.wrap(adamw(ddp.parameters()), 2, model=ddp, max_grad_norm=0.5)
    ends = [sum(sizes[: i + 1]) - 1 for i in range(len(sizes))]
    with CollectiveCounter() as calls:
        for i, (x, y) in enumerate(rank_batches(rank, sum(sizes))):
            if i in changes:
                opt.accum_steps = changes[i]
            assert ddp.require_backward_grad_sync == (i in ends), f"sync flag before forward {i}"
            opt.backward(mean_loss(ddp, x, y), num_items=len(y))
            assert opt.step() == (i in ends)
            if i in ends:
                assert sorted(calls.all_reduce) == ddp_bucket_numels(ddp), f"micro-batch {i}"
            calls.reset()
    assert opt.stats()["windows"] == len(sizes)
    assert_matches(model, want)


def chained_optimizers(rank: int, world: int) -> None:
    """``wrap([sgd, adamw], K)``: two optimizers over one DDP model share the window, one
    all-reduce per bucket per window, and the clip by the norm over every parameter of
    both; training equals the native two-optimizer loop on the large batch. The same with
    the AdamW member as fastaccum.optim.AdamW (its fused kernel updates its parameters)."""
    n = K * WINDOWS
    want, _ = large_batch_run(sgd_adamw, global_windows(world, n), max_grad_norm=0.5)
    for kind in ("torch", "fused-adamw"):
        check_chained(rank, n, want, members_of(kind))


def check_chained(rank: int, n: int, want: torch.nn.Module, make_members) -> None:
    """chained_optimizers' run and checks for the optimizers ``make_members(params)``."""
    model = fastaccum.fuse_wgrad(make_model())
    ddp = DDP(model, bucket_cap_mb=SMALL_BUCKETS_MB)
    opt = fastaccum.wrap(make_members(ddp.parameters()), K, model=ddp, max_grad_norm=0.5)
    norms = []
    with CollectiveCounter() as calls:
        for i, (x, y) in enumerate(rank_batches(rank, n)):
            assert ddp.require_backward_grad_sync == ((i + 1) % K == 0), f"forward {i}"
            opt.backward(mean_loss(ddp, x, y), num_items=len(y))
            if opt.step():
                assert sorted(calls.all_reduce) == ddp_bucket_numels(ddp), f"micro-batch {i}"
                norms.append(opt.stats()["grad_norm"])
            calls.reset()
    assert len(norms) == WINDOWS and min(norms) > 0.5  # every window clipped, globally
    assert opt._fused_seen  # the Linear weights went through the fused GEMM
    assert_matches(model, want)


def zero_redundancy_optimizer(rank: int, world: int) -> None:
    """``wrap(ZeroRedundancyOptimizer(...), K, model=ddp)``: the optimizer state is
    sharded over the ranks (ZeRO-1) while the window is fastaccum's; training equals the
    large-batch run, and after ``consolidate_state_dict`` rank 0's ``opt.state_dict()``
    holds every parameter's state."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    n = K * WINDOWS
    want, _ = large_batch_run(adamw, global_windows(world, n), max_grad_norm=0.5)
    model = make_model()
    ddp = DDP(model)
    zero = ZeroRedundancyOptimizer(
        ddp.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2, weight_decay=0.1
    )
    opt = fastaccum.wrap(zero, K, model=ddp, max_grad_norm=0.5)
    for x, y in rank_batches(rank, n):
        opt.backward(mean_loss(ddp, x, y), num_items=len(y))
        opt.step()
    assert_matches(model, want)
    params = len(list(model.parameters()))
    shard = torch.tensor([len(zero.optim.state)])
    dist.all_reduce(shard)
    assert 0 < len(zero.optim.state) < params and int(shard) == params
    zero.consolidate_state_dict(to=0)
    if rank == 0:
        assert len(opt.state_dict()["optimizer"]["state"]) == params


def every_rank_window(ref, world: int, w: int) -> tuple[list, list[float]]:
    """float64 mean-loss gradients and item counts of window ``w``'s micro-batches on
    every rank, rank by rank."""
    grads, sizes = [], []
    for r in range(world):
        g, n = micro_gradients(ref, rank_batches(r, K * WINDOWS)[w * K : (w + 1) * K], mean_loss)
        grads += g
        sizes += n
    return grads, sizes


def assert_same_on_every_rank(value: float) -> None:
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    assert values == [value] * len(values)


def noise_scale_pooled_over_ranks(rank: int, world: int) -> None:
    """Under DDP every rank estimates the noise scale from every rank's micro-batches
    against the global window, so that all ranks hold the same value (a schedule that
    changes accum_steps from it keeps the ranks in step). With num_items (in items) and
    without (in micro-batches), against float64 gradients fed to the same estimator."""
    from fastaccum.stats import NoiseScaleTracker

    ref = make_model().double()  # lr 0: the weights stay those of the reference
    batches = rank_batches(rank, K * WINDOWS)
    for with_items in (True, False):
        model = make_model()
        ddp = DDP(model, bucket_cap_mb=SMALL_BUCKETS_MB)
        opt = fastaccum.wrap(torch.optim.SGD(ddp.parameters(), lr=0.0), K, model=ddp)
        reference = NoiseScaleTracker()
        for w in range(WINDOWS):
            for x, y in batches[w * K : (w + 1) * K]:
                opt.backward(mean_loss(ddp, x, y), num_items=len(y) if with_items else None)
                opt.step()
            grads, sizes = every_rank_window(ref, world, w)
            if with_items:
                mean = [
                    sum(n * g[i] for n, g in zip(sizes, grads, strict=True)) / sum(sizes)
                    for i in range(len(grads[0]))
                ]
                reference.update([sq(g) for g in grads], sq(mean), sizes)
            else:
                mean = [sum(g[i] for g in grads) / len(grads) for i in range(len(grads[0]))]
                reference.update([sq(g) for g in grads], sq(mean))
        stats = opt.stats()
        assert stats["noise_scale_units"] == ("items" if with_items else "micro-batches")
        assert opt.noise_scale_tracker.windows == reference.windows == WINDOWS
        assert opt.noise_scale_tracker.grad_sq == pytest.approx(reference.grad_sq, rel=1e-4)
        assert opt.noise_scale_tracker.trace == pytest.approx(reference.trace, rel=1e-4)
        assert stats["noise_scale"] == pytest.approx(reference.noise_scale, rel=1e-4)
        assert_same_on_every_rank(stats["noise_scale"])


def noise_scale_with_fused_wgrad(rank: int, world: int) -> None:
    """With fuse_wgrad under DDP the noise scale is estimated too: the fused layers' part
    from every rank's first micro-batch (read from its accumulators) and the fused part of
    the reduced window (measured in the reduction), the LayerNorm's from every rank's
    micro-batches, each against the window of every rank. The reference feeds float64
    gradients of each micro-batch and of the global window to the same estimator."""
    from fastaccum.stats import NoiseScaleTracker, noise_scale_terms

    model = fastaccum.fuse_wgrad(make_model())
    ref = make_model().double()  # lr 0: the weights stay those of the reference
    ddp = DDP(model, bucket_cap_mb=SMALL_BUCKETS_MB)
    opt = fastaccum.wrap(torch.optim.SGD(ddp.parameters(), lr=0.0), K, model=ddp)
    norms = {id(p) for m in ref if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    fused = [id(p) not in norms for p in ref.parameters()]
    reference = NoiseScaleTracker()

    def part(tensors, of_fused: bool) -> list[torch.Tensor]:
        return [t for t, f in zip(tensors, fused, strict=True) if f == of_fused]

    batches = rank_batches(rank, K * WINDOWS)
    for w in range(WINDOWS):
        window = batches[w * K : (w + 1) * K]
        for x, y in window:
            opt.backward(mean_loss(ddp, x, y), num_items=len(y))
            opt.step()
        mean, total = global_mean(*micro_gradients(ref, window, mean_loss))
        grads, sizes = every_rank_window(ref, world, w)
        grad_sq, trace = noise_scale_terms(
            [sq(part(g, False)) for g in grads], sq(part(mean, False)), sizes, window_size=total
        )
        fused_grad_sq, fused_trace = noise_scale_terms(
            [sq(part(grads[r * K], True)) for r in range(world)],
            sq(part(mean, True)),
            sizes[::K],
            window_size=total,
        )
        reference.update_terms(grad_sq + fused_grad_sq, trace + fused_trace)
    assert opt._fused_seen  # the fused GEMMs wrote the Linear and Embedding weights
    assert opt.noise_scale_tracker.windows == reference.windows == WINDOWS
    assert opt.noise_scale_tracker.grad_sq == pytest.approx(reference.grad_sq, rel=1e-4)
    assert opt.noise_scale_tracker.trace == pytest.approx(reference.trace, rel=1e-4)
    assert opt.stats()["noise_scale"] == pytest.approx(reference.noise_scale, rel=1e-4)
    assert_same_on_every_rank(opt.stats()["noise_scale"])


SCENARIOS = by_name(
    opt_backward_one_allreduce_per_bucket,
    step_path_and_flush,
    flush_with_an_empty_rank,
    ranks_that_feed_a_window_differently,
    wrap_without_the_ddp_model_warns,
    fused_wgrad_and_fused_adamw,
    static_graph,
    find_unused_with_varying_usage,
    unused_at_boundary_without_find_unused,
    nonfinite_skips_on_every_rank,
    batchnorm_merged_across_ranks,
    accumulate_context_and_partial_window,
    dropped_wrapper_leaves_plain_ddp,
    mid_window_resume_per_rank,
    accum_steps_schedule,
    chained_optimizers,
    zero_redundancy_optimizer,
    noise_scale_pooled_over_ranks,
    noise_scale_with_fused_wgrad,
)


test_ddp = scenario_test(SCENARIOS)
