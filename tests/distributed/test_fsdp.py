"""fastaccum.wrap(opt, K, model=fully_shard(...)) (FSDP2) on 2 gloo ranks.

Same data and references as test_ddp.py: rank 1's micro-batches are 2-3x longer, and the
reference is one process training on the concatenated batches of both ranks. FSDP2's
reduce-scatters are counted by passing torch.distributed.reduce_scatter_single (what its
default reduce-scatter calls) through a counter.
"""

from __future__ import annotations

import io
import re
import shutil
import tempfile
import warnings
import weakref

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import fastaccum
from fastaccum.memory.peak import LiveTensorBytes
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
    assert_close_rel,
    collector_off,
    large_batch_run,
    make_model,
    mean_loss,
    members_of,
    sgd_adamw,
)


def sharded_model(seed: int = 0, fuse: bool = False, **options) -> torch.nn.Module:
    """The token model (its layers fused first with ``fuse``) with each layer that has
    parameters, and the whole, fully_shard-ed with ``options``."""
    model = make_model(seed)
    if fuse:
        fastaccum.fuse_wgrad(model)
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, **options)
    return fully_shard(model, **options)


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def wrapped_adamw(model: torch.nn.Module, **options) -> fastaccum.AccumulatingOptimizer:
    """fastaccum.wrap(adamw) over the sharded ``model``, K micro-batches a window."""
    return fastaccum.wrap(adamw(model.parameters()), K, model=model, **options)


def fused_adamw(model: torch.nn.Module, **options) -> fastaccum.AccumulatingOptimizer:
    """fastaccum.optim.AdamW with adamw's settings over the sharded ``model``."""
    return fastaccum.optim.AdamW(
        model.parameters(), lr=1e-2, weight_decay=0.1, accum_steps=K, model=model, **options
    )


AMSGRAD = {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True, "betas": (0.9, 0.5)}


def amsgrad_adamw(params):
    return torch.optim.AdamW(params, **AMSGRAD)


def fused_amsgrad_adamw(model: torch.nn.Module, **options) -> fastaccum.AccumulatingOptimizer:
    """fastaccum.optim.AdamW(amsgrad=True) with amsgrad_adamw's settings."""
    return fastaccum.optim.AdamW(
        model.parameters(), **AMSGRAD, accum_steps=K, model=model, **options
    )


def nesterov(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True)


def fused_nesterov(model: torch.nn.Module, **options) -> fastaccum.AccumulatingOptimizer:
    """fastaccum.optim.SGD with nesterov's settings over the sharded ``model``."""
    return fastaccum.optim.SGD(
        model.parameters(),
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        accum_steps=K,
        model=model,
        **options,
    )


class ReduceScatterCounter:
    """Counts the reduce-scatters FSDP2 issues, passing each one on: calls of
    torch.distributed.reduce_scatter_single (torch 2.13), or of reduce_scatter_tensor where
    that function does not exist yet (torch 2.11)."""

    def __enter__(self) -> ReduceScatterCounter:
        self.calls = 0
        self._name = (
            "reduce_scatter_single"
            if hasattr(dist, "reduce_scatter_single")
            else "reduce_scatter_tensor"
        )
        self._real = getattr(dist, self._name)

        def counted(*args, **kwargs):
            self.calls += 1
            return self._real(*args, **kwargs)

        setattr(dist, self._name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(dist, self._name, self._real)


def assert_matches(model: torch.nn.Module, want: torch.nn.Module) -> None:
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        full = p.full_tensor()
        assert_close_rel(full, q, 1e-5)
        assert same_on_all_ranks(full.detach())


def train(model, opt, batches, counter=None) -> list[int]:
    """opt.backward path; the reduce-scatter calls of each micro-batch."""
    calls = []
    for x, y in batches:
        before = counter.calls if counter else 0
        opt.backward(mean_loss(model, x, y), num_items=len(y))
        calls.append((counter.calls if counter else 0) - before)
        opt.step()
    return calls


# --------------------------------------------------------------------------- scenarios


def window_mode(rank: int, world: int) -> None:
    """Default mode: gradient sync off inside a window, FSDP2 reduce-scatters only the
    boundary backward (one per FSDP module), and training equals the large-batch run."""
    check_window_mode(rank, world, adamw)


def check_window_mode(
    rank: int, world: int, make_opt, build=None, fuse: bool = False
) -> fastaccum.AccumulatingOptimizer:
    """window_mode's run and checks, for the optimizer (or list) ``make_opt(params)``
    wrapped, or the optimizer ``build(model, max_grad_norm=0.5)`` makes (``make_opt``'s
    then gives the reference), on the model fused with ``fuse``; returns it."""
    n = K * WINDOWS
    want, _ = large_batch_run(make_opt, global_windows(world, n), max_grad_norm=0.5)
    model = sharded_model(fuse=fuse)
    if build is None:
        opt = fastaccum.wrap(make_opt(model.parameters()), K, model=model, max_grad_norm=0.5)
    else:
        opt = build(model, max_grad_norm=0.5)
    with ReduceScatterCounter() as counter:
        calls = train(model, opt, rank_batches(rank, n), counter)
    groups = 4  # the embedding, two linears and the layer norm each have an FSDP module
    assert calls == [0, 0, 0, groups] * WINDOWS, calls
    assert opt.stats()["grad_norm"] > 0.5  # clipped: the norm is the global one
    assert_matches(model, want)
    return opt


def every_micro_step_mode(rank: int, world: int, build=wrapped_adamw) -> None:
    """reduce_scatter_every_micro_step=True: a reduce-scatter per module per micro-batch,
    fp32 shard accumulators, and flush() of a partial last window works."""
    n = K * WINDOWS + 2
    want, _ = large_batch_run(adamw, global_windows(world, n), max_grad_norm=0.5)
    model = sharded_model()
    opt = build(model, max_grad_norm=0.5, reduce_scatter_every_micro_step=True)
    with ReduceScatterCounter() as counter:
        calls = train(model, opt, rank_batches(rank, n), counter)
    assert calls == [4] * n, calls
    assert opt.flush() is True
    assert_matches(model, want)


def partial_window_needs_last(rank: int, world: int) -> None:
    """Default mode: flush() of a partial window raises (FSDP2 still holds its unsharded
    gradients) and changes nothing; closing it with accumulate(last=True) is exact."""
    n = K + 2
    want, _ = large_batch_run(adamw, global_windows(world, n))
    model = sharded_model()
    opt = fastaccum.wrap(adamw(model.parameters()), K, model=model)
    batches = rank_batches(rank, n)
    train(model, opt, batches[: K + 1])
    with pytest.raises(RuntimeError, match=re.escape("accumulate(last=True)")):
        opt.flush()
    assert opt.micro_step == 1
    # The window's gradients are FSDP2's, so no state dict could hold them: refused.
    with pytest.raises(RuntimeError, match="middle of an FSDP2 window"):
        opt.state_dict()
    assert opt.micro_step == 1
    x, y = batches[-1]
    with opt.accumulate(last=True):
        opt.backward(mean_loss(model, x, y), num_items=len(y))
    assert opt.step() is True
    assert_matches(model, want)


def mid_window_resume_every_micro_step(rank: int, world: int) -> None:
    """reduce_scatter_every_micro_step=True keeps the window in the wrapper's shard
    accumulators: opt.state_dict() mid-window, loaded (with the model's) into a new
    sharded model and wrapper, goes on bit-identically to the run never stopped."""
    batches = rank_batches(rank, K * WINDOWS)
    straight = sharded_model()
    straight_opt = wrapped_adamw(straight, reduce_scatter_every_micro_step=True)
    train(straight, straight_opt, batches)
    model = sharded_model()
    opt = wrapped_adamw(model, reduce_scatter_every_micro_step=True)
    train(model, opt, batches[: K + 2])
    assert opt.micro_step == 2
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=False)
    model = sharded_model(seed=99)
    opt = wrapped_adamw(model, reduce_scatter_every_micro_step=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    assert opt.micro_step == 2
    train(model, opt, batches[K + 2 :])
    for p, q in zip(model.parameters(), straight.parameters(), strict=True):
        assert torch.equal(p.to_local(), q.to_local())


def step_path(rank: int, world: int) -> None:
    """loss.backward(); opt.step(num_items=n) cannot weight FSDP2's already reduced
    gradients: ValueError, nothing folded. Without num_items (micro-batches weigh equally)
    the step path is exact."""
    n = K * 2
    model = sharded_model()
    opt = fastaccum.wrap(adamw(model.parameters()), K, model=model)
    batches = rank_batches(rank, n)
    x, y = batches[0]
    mean_loss(model, x, y).backward()
    with pytest.raises(ValueError, match=re.escape("opt.backward(loss, num_items=n)")):
        opt.step(num_items=len(y))
    assert opt.micro_step == 0
    opt.zero_grad()
    # FSDP2 kept the unsharded gradient of that backward; start from a fresh model.
    model = sharded_model()
    opt = fastaccum.wrap(adamw(model.parameters()), K, model=model)
    for x, y in batches:
        mean_loss(model, x, y).backward()
        opt.step()
    ref = make_model()
    ref_opt = adamw(ref.parameters())
    windows = [[(b, 1) for b in window] for window in global_windows(world, n)]
    weighted_reference(ref, ref_opt, windows, lambda m, e: (mean_loss(m, *e[0]), e[1]))
    assert_matches(model, ref)


def configuration_checks(rank: int, world: int) -> None:
    """Sharded parameters without model=, and the fused classes, are refused up front; bf16
    unsharded gradients kept between micro-batches are warned about."""
    model = sharded_model()
    with pytest.raises(ValueError, match="pass the fully_shard model as model="):
        fastaccum.wrap(adamw(model.parameters()), K)
    # A fused class may still join a list that has the model: refused at its first use.
    alone = fastaccum.optim.AdamW(model.parameters(), accum_steps=K)
    x, y = rank_batches(rank, 1)[0]
    for use in (lambda: alone.backward(mean_loss(model, x, y)), alone.step, alone.flush):
        with pytest.raises(ValueError, match=r"local shards, or give this optimizer to fastaccum"):
            use()
    assert alone.micro_step == 0 and all(p.grad is None for p in model.parameters())
    half = fully_shard(make_model().to(torch.bfloat16))
    with pytest.raises(TypeError, match=re.escape("needs float32 parameters")):
        fastaccum.optim.AdamW(half.parameters(), accum_steps=K, model=half)
    bf16 = fully_shard(make_model(), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    with pytest.warns(UserWarning, match=re.escape("reduce_dtype=torch.float32")):
        fastaccum.wrap(adamw(bf16.parameters()), K, model=bf16)
    fp32_grads = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = fully_shard(make_model(), mp_policy=fp32_grads)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastaccum.wrap(adamw(model.parameters()), K, model=model)


def dropped_wrapper_leaves_plain_fsdp(rank: int, world: int) -> None:
    """Dropping the wrapper mid-window (gradient sync off) frees it, turns FSDP2's sync back
    on and discards the partial window FSDP2 kept: a plain backward then reduce-scatters
    every module once and gives the gradients of a fresh model with the same weights."""
    model = sharded_model()
    opt = fastaccum.wrap(adamw(model.parameters()), K, model=model)
    batches = rank_batches(rank, K + 2)
    train(model, opt, batches[: K + 1])  # one window, then one micro-batch of the next
    ref = weakref.ref(opt)
    with collector_off():  # freed by reference counting: nothing the model keeps holds it
        del opt
        assert ref() is None

    fresh = sharded_model()
    fresh.load_state_dict(model.state_dict())
    x, y = batches[K + 1]
    with ReduceScatterCounter() as counter:
        mean_loss(model, x, y).backward()
    assert counter.calls == 4  # one per FSDP module, as FSDP2 does alone
    mean_loss(fresh, x, y).backward()
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert_close_rel(p.grad.full_tensor(), q.grad.full_tensor(), 1e-6)


def accum_steps_schedule(rank: int, world: int) -> None:
    """``opt.accum_steps`` changed at a boundary and mid-window: gradient sync follows the
    new K (one reduce-scatter per module, on each window's last backward only), and
    training equals the large-batch run with windows of the scheduled sizes."""
    sizes = [2, 5, 1, 2]  # the changes of test_ddp.py's accum_steps_schedule
    changes = {2: 4, 4: 5, 7: 1, 8: 8, 9: 2}
    want, _ = large_batch_run(adamw, windows_of_sizes(world, sizes))
    model = sharded_model()
    opt = fastaccum.wrap(adamw(model.parameters()), 2, model=model)
    calls = []
    with ReduceScatterCounter() as counter:
        for i, batch in enumerate(rank_batches(rank, sum(sizes))):
            if i in changes:
                opt.accum_steps = changes[i]
            calls += train(model, opt, [batch], counter)
    groups = 4
    ends = [sum(sizes[: i + 1]) - 1 for i in range(len(sizes))]
    assert calls == [groups if i in ends else 0 for i in range(sum(sizes))], calls
    assert_matches(model, want)


def chained_optimizers(rank: int, world: int) -> None:
    """``wrap([sgd, adamw], K)`` over an FSDP2 model: as window_mode, with the clip by the
    norm over both optimizers' shards and the native two-optimizer loop as reference; also
    with the AdamW member as fastaccum.optim.AdamW, whose kernel updates its shards."""
    check_window_mode(rank, world, sgd_adamw)

    def with_fused_adamw(model, **options):
        return fastaccum.wrap(
            members_of("fused-adamw")(model.parameters()), K, model=model, **options
        )

    check_window_mode(rank, world, sgd_adamw, with_fused_adamw)


def noise_scale(rank: int, world: int) -> None:
    """Default mode: after each window's first micro-batch the wrapper reads this rank's
    unsharded gradient of it, which FSDP2 keeps; the first micro-batches of every rank
    with the reduced window's norm estimate the noise scale as for a fused layer, the
    same on every rank. With
    reduce_scatter_every_micro_step each micro-batch arrives reduced over the ranks: the
    estimate uses the global micro-batches (the k-th of every rank: the shards' sums of
    squares and the item counts summed over ranks). Both against float64 gradients of
    the micro-batches and of both ranks' window, fed to the same estimator."""
    check_noise_scale(rank, sharded_model)


def check_noise_scale(rank: int, make_sharded) -> None:
    """:func:`noise_scale`'s runs and checks on the model ``make_sharded()`` (with lr 0),
    the window norm against the float64 one too."""
    from fastaccum.stats import NoiseScaleTracker, noise_scale_terms

    ref = make_model().double()  # lr 0: the weights stay those of the reference
    batches = rank_batches(rank, K * WINDOWS)
    for every in (False, True):
        model = make_sharded()
        opt = fastaccum.wrap(
            torch.optim.SGD(model.parameters(), lr=0.0),
            K,
            model=model,
            reduce_scatter_every_micro_step=every,
        )
        reference = NoiseScaleTracker()
        for w in range(WINDOWS):
            window = batches[w * K : (w + 1) * K]
            train(model, opt, window)
            grads, sizes = micro_gradients(ref, window, mean_loss)
            mean, total = global_mean(grads, sizes)
            assert opt.stats()["grad_norm"] == pytest.approx(sq(mean) ** 0.5, rel=1e-5)
            if every:
                micro = [global_mean([g], [n]) for g, n in zip(grads, sizes, strict=True)]
                reference.update([sq(m) for m, _ in micro], sq(mean), [n for _, n in micro])
            else:  # the first micro-batch of every rank
                firsts = [
                    micro_gradients(ref, rank_batches(r, K * WINDOWS)[w * K : w * K + 1], mean_loss)
                    for r in range(dist.get_world_size())
                ]
                first = noise_scale_terms(
                    [sq(g[0]) for g, _ in firsts],
                    sq(mean),
                    [n[0] for _, n in firsts],
                    window_size=total,
                )
                reference.update_terms(*first)
        # every micro-batch's norm is known only when each arrives reduced
        assert bool(opt.stats()["micro_batch_sumsq"]) == every
        assert opt.noise_scale_tracker.windows == reference.windows == WINDOWS
        assert opt.noise_scale_tracker.grad_sq == pytest.approx(reference.grad_sq, rel=1e-4)
        assert opt.noise_scale_tracker.trace == pytest.approx(reference.trace, rel=1e-4)
        assert opt.stats()["noise_scale"] == pytest.approx(reference.noise_scale, rel=1e-4)
        values: list = [None] * dist.get_world_size()
        dist.all_gather_object(values, opt.stats()["noise_scale"])
        assert values == [values[0]] * len(values)  # the same estimate on every rank


class WgradCalls:
    """Counts the fused layers' writes into FSDP2's window gradients (one per weight and
    per trained bias), passing each on."""

    def __enter__(self) -> WgradCalls:
        from fastaccum.distributed import FSDPWindow

        self.calls = 0
        self._real = real = FSDPWindow.window_grad

        def counted(window, t):
            self.calls += 1
            return real(window, t)

        FSDPWindow.window_grad = counted
        return self

    def __exit__(self, *exc: object) -> None:
        from fastaccum.distributed import FSDPWindow

        FSDPWindow.window_grad = self._real


class CreatedBytes(LiveTensorBytes):
    """Counts the bytes of every CPU tensor storage created while active (freed or not)."""

    def __init__(self) -> None:
        super().__init__()
        self.created = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.current
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.created += max(0, self.current - before)
        return out


def second_backward_bytes(fuse: bool, rank: int) -> int:
    """Bytes created by the backward of a window's second micro-batch (the first made
    FSDP2's unsharded window gradients), on the fused or the plain model."""
    model = sharded_model(fuse=fuse)
    opt = wrapped_adamw(model)
    (x0, y0), (x1, y1) = rank_batches(rank, 2)
    opt.backward(mean_loss(model, x0, y0), num_items=len(y0))
    opt.step()
    loss = mean_loss(model, x1, y1)
    with CreatedBytes() as counter:
        opt.backward(loss, num_items=len(y1))
    opt.step()
    return counter.created


def fused_wgrad(rank: int, world: int) -> None:
    """fuse_wgrad under FSDP2: off the boundary the fused Linear and Embedding layers add
    their weight gradients into the window gradient FSDP2 keeps unsharded (no dW per
    micro-batch), on the boundary too; training equals the large batch, with the fused
    AdamW as well. Under bf16 compute with reduce_dtype=float32 they add into FSDP2's fp32
    window gradient (close to the unfused run); with bf16 reduction, or reducing every
    micro-batch, they run as plain layers."""
    with WgradCalls() as calls:
        check_window_mode(rank, world, adamw, fuse=True)
    n = K * WINDOWS
    assert calls.calls == 5 * n  # two Linears' weights and biases, the Embedding's weight
    check_window_mode(rank, world, adamw, fused_adamw, fuse=True)

    # The window gradient the optimizer is handed equals the unfused layers' (AdamW above
    # would hardly see a wrong scale).
    handed = []
    for fuse in (True, False):
        model = sharded_model(fuse=fuse)
        inner = torch.optim.SGD(model.parameters(), lr=0.0)
        seen = []
        inner.register_step_pre_hook(
            lambda o, args, kwargs, seen=seen: seen.append(
                [p.grad.full_tensor() for g in o.param_groups for p in g["params"]]
            )
        )
        train(model, fastaccum.wrap(inner, K, model=model), rank_batches(rank, K))
        handed.append(seen[0])
    for p, q in zip(*handed, strict=True):
        assert_close_rel(p, q, 1e-6)

    # No dW: the second micro-batch's backward creates less by at least the bytes of the
    # fused layers' (unsharded) weights.
    weights = sum(
        layer.weight.numel() * 4
        for layer in make_model()
        if isinstance(layer, (torch.nn.Linear, torch.nn.Embedding))
    )
    saved = second_backward_bytes(False, rank) - second_backward_bytes(True, rank)
    assert saved >= weights, (saved, weights)

    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    trained = []
    for fuse in (True, False):
        model = sharded_model(fuse=fuse, mp_policy=bf16)
        opt = wrapped_adamw(model, max_grad_norm=0.5)
        with WgradCalls() as calls:
            train(model, opt, rank_batches(rank, n))
        assert (calls.calls > 0) == fuse
        trained.append([p.full_tensor() for p in model.parameters()])
    for p, q in zip(*trained, strict=True):
        assert_close_rel(p, q, 1e-2)
    for options in ({"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16)}, {}):
        model = sharded_model(fuse=True, **options)
        every = not options
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bf16 window gradients: warned about
            opt = wrapped_adamw(model, reduce_scatter_every_micro_step=every)
        with WgradCalls() as calls:
            train(model, opt, rank_batches(rank, K))
        assert calls.calls == 0


def fused_classes(rank: int, world: int) -> None:
    """fastaccum.optim.AdamW (also with amsgrad) and SGD (Nesterov momentum) over an FSDP2
    model: each fused update runs on the local shards, equal to torch's own class at the
    large batch with the clip by the global norm; their state is torch's, as sharded
    DTensors. With reduce_scatter_every_micro_step and flush() too."""
    from torch.distributed.tensor import DTensor

    opt = check_window_mode(rank, world, adamw, fused_adamw)
    states = list(opt.optimizer.state.values())
    assert len(states) == len(list(opt.optimizer.param_groups[0]["params"]))
    for state in states:
        assert isinstance(state["exp_avg"], DTensor)
        assert isinstance(state["exp_avg_sq"], DTensor)
        assert int(state["step"]) == WINDOWS
    opt = check_window_mode(rank, world, nesterov, fused_nesterov)
    for state in opt.optimizer.state.values():
        assert isinstance(state["momentum_buffer"], DTensor)
    opt = check_window_mode(rank, world, amsgrad_adamw, fused_amsgrad_adamw)
    for state in opt.optimizer.state.values():
        assert isinstance(state["max_exp_avg_sq"], DTensor)
    every_micro_step_mode(rank, world, fused_adamw)

    # A one-row head: rank 1's shards of its weight and bias are empty.
    trained = []
    for build in (wrapped_adamw, fused_adamw):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        fully_shard(model)
        assert model[2].bias.to_local().numel() == (1 if rank == 0 else 0)
        start = [p.full_tensor().clone() for p in model.parameters()]
        opt = build(model, max_grad_norm=0.1)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(K * 2):
            opt.backward(model(torch.randn(4, 16, generator=gen)).pow(2).mean(), num_items=4)
            opt.step()
        trained.append([p.full_tensor() for p in model.parameters()])
        assert not any(torch.equal(p, q) for p, q in zip(trained[-1], start, strict=True))
    for p, q in zip(*trained, strict=True):
        assert_close_rel(p, q, 1e-6)


def fused_checkpoint(rank: int, world: int) -> None:
    """distributed_checkpoint with fastaccum.optim.AdamW."""
    distributed_checkpoint(rank, world, fused_adamw)


def distributed_checkpoint(rank: int, world: int, build=wrapped_adamw) -> None:
    """dcp.save of get_state_dict(model, opt) after one window, then dcp.load and
    set_state_dict into a new sharded model and wrapper (which never stepped): the run
    goes on bit-identically to one without the checkpoint, on every shard."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    batches = rank_batches(rank, K * WINDOWS)
    straight = sharded_model()
    straight_opt = build(straight)
    train(straight, straight_opt, batches)

    where = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(where, src=0)
    try:
        model = sharded_model()
        opt = build(model)
        train(model, opt, batches[:K])
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=where[0])

        model = sharded_model(seed=99)
        opt = build(model)
        model_sd, optim_sd = get_state_dict(model, opt)
        assert opt.micro_step == 0
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=where[0])
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        train(model, opt, batches[K:])
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(where[0])
    for p, q in zip(model.parameters(), straight.parameters(), strict=True):
        assert torch.equal(p.to_local(), q.to_local())


SCENARIOS = by_name(
    window_mode,
    every_micro_step_mode,
    partial_window_needs_last,
    mid_window_resume_every_micro_step,
    step_path,
    configuration_checks,
    dropped_wrapper_leaves_plain_fsdp,
    accum_steps_schedule,
    chained_optimizers,
    distributed_checkpoint,
    fused_classes,
    fused_checkpoint,
    noise_scale,
    fused_wgrad,
)


test_fsdp = scenario_test(SCENARIOS)
