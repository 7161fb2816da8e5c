"""fastaccum.wrap: K micro-batches train exactly like one batch of K times the size.

References are independent of fastaccum: the same model trained by the plain torch
optimizer on the concatenated batch (one backward over all items), in the same dtype.
"""

import copy
import io
import math
import warnings

import pytest
import torch

import fastaccum
import fastaccum.optim as fo
from fastaccum import _backend
from tests.helpers import (
    assert_close_rel,
    large_batch_run,
    make_model,
    make_opt,
    mean_loss,
    run_with_checkpoint,
    split_windows,
    token_batches,
)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("mode", ["step", "backward"])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_matches_large_batch_training(kind, mode, max_grad_norm):
    k = 8
    batches = token_batches(5 * k - 3)  # 4 full windows, then a partial one for flush()
    windows = split_windows(batches, k)
    want, _ = large_batch_run(lambda params: make_opt(kind, params), windows, max_grad_norm)

    model = make_model()
    opt = fo.wrap(make_opt(kind, model.parameters()), k, model=model, max_grad_norm=max_grad_norm)
    stepped = []
    for x, y in batches:
        loss = mean_loss(model, x, y)
        if mode == "backward":
            opt.backward(loss, num_items=len(y))
            stepped.append(opt.step())
        else:
            loss.backward()
            stepped.append(opt.step(num_items=len(y)))
        opt.zero_grad()
    assert stepped == [(i + 1) % k == 0 for i in range(len(batches))]
    assert opt.micro_step == k - 3
    assert opt.flush() is True
    assert opt.micro_step == 0

    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)
    assert opt.stats()["windows"] == 5
    assert opt.stats()["items_seen"] == sum(len(b[1]) for b in batches)


def test_without_num_items_micro_batches_weigh_equally():
    batches = token_batches(4, seed=3)
    model = make_model()
    opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 4)
    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x, y in batches:
        mean_loss(model, x, y).backward()
        opt.step()
        (mean_loss(ref, x, y) / 4).backward()  # the native loop: loss / K
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p, q, 1e-6)


def test_stats_report_norms_against_float64():
    batches = token_batches(3, seed=4)
    model = make_model()
    opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=0.0), 3, model=model)
    ref = copy.deepcopy(model).double()
    micro = []
    total = [torch.zeros_like(p) for p in ref.parameters()]
    items = sum(len(y) for _, y in batches)
    for x, y in batches:
        mean_loss(model, x, y).backward()
        opt.step(num_items=len(y))
        g = torch.autograd.grad(mean_loss(ref, x, y), list(ref.parameters()))
        micro.append(sum(t.square().sum() for t in g).item())
        for t, gi in zip(total, g, strict=True):
            t += gi * len(y) / items
    s = opt.stats()
    want_norm = math.sqrt(sum(t.square().sum().item() for t in total))
    assert s["grad_norm"] == pytest.approx(want_norm, rel=1e-5)
    assert s["micro_batch_sumsq"] == pytest.approx(micro, rel=1e-5)
    assert s["micro_step"] == 0 and s["skipped_windows"] == 0 and s["items_seen"] == items


def test_bf16_accumulation_is_10x_more_exact_than_native():
    """32 micro-batches of bf16 gradients: fp32 accumulators vs native bf16 ``.grad +=``.

    Both sum the very same bf16 micro-batch gradients, so the float64 sum of those is the
    exact answer and the error measured is the accumulation's alone.
    """
    k = 32
    model = make_model(dtype=torch.bfloat16)
    micro_grads = [
        torch.autograd.grad(mean_loss(model, x, y), list(model.parameters()))
        for x, y in token_batches(k, seed=5)
    ]
    truth = [sum(g[i].double() for g in micro_grads) / k for i in range(len(micro_grads[0]))]
    native = [torch.zeros_like(t, dtype=torch.bfloat16) for t in truth]
    for g in micro_grads:
        for n, gi in zip(native, g, strict=True):
            n += gi / k  # what (loss / K).backward() does to a bf16 .grad

    inner = torch.optim.SGD(model.parameters(), lr=0.0)
    opt = fo.wrap(inner, k, master_weights=True)
    captured = []
    inner.register_step_pre_hook(
        lambda o, a, kw: captured.extend(
            p.grad.clone() for g in o.param_groups for p in g["params"]
        )
    )
    for g in micro_grads:
        for p, gi in zip(model.parameters(), g, strict=True):
            p.grad = gi.clone()
        opt.step()
    assert len(captured) == len(truth)

    def rel(gs):
        err = sum((g.double() - t).square().sum() for g, t in zip(gs, truth, strict=True))
        return math.sqrt(err / sum(t.square().sum() for t in truth))

    assert rel(captured) * 10 <= rel(native), (rel(captured), rel(native))


def test_master_weights_keep_fp32_copies():
    model = make_model(dtype=torch.bfloat16)
    before = [p.detach().float().clone() for p in model.parameters()]
    opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=1e-3), 2, master_weights=True)
    for x, y in token_batches(4, seed=6):
        mean_loss(model, x, y).backward()
        opt.step()
    masters = [p for g in opt.param_groups for p in g["params"]]
    assert all(m.dtype == torch.float32 for m in masters)
    for p, m, b in zip(model.parameters(), masters, before, strict=True):
        assert torch.equal(p, m.bfloat16())  # the model is refreshed from the masters
        # lr 1e-3 updates are below bf16 resolution for many entries: the masters keep them
        assert not torch.equal(m, b)


def test_master_weights_take_over_state_from_steps_before_wrapping():
    """An AdamW that already stepped a bf16 model (its state is bf16) is wrapped with
    master_weights: the state moves to the fp32 masters in fp32 (a bf16 exp_avg would make
    the first window's step fail) and training continues the step count."""
    model = make_model(dtype=torch.bfloat16)
    inner = make_opt("adamw", model.parameters())
    x, y = token_batches(1, seed=4)[0]
    mean_loss(model, x, y).backward()
    inner.step()
    inner.zero_grad()
    assert inner.state[model[1].weight]["exp_avg"].dtype == torch.bfloat16
    opt = fo.wrap(inner, 2, model=model, master_weights=True)
    for x, y in token_batches(4, seed=6):
        mean_loss(model, x, y).backward()
        opt.step()
    masters = [p for g in opt.param_groups for p in g["params"]]
    assert len(inner.state) == len(masters)
    for m in masters:
        assert {inner.state[m][key].dtype for key in ("exp_avg", "exp_avg_sq")} == {torch.float32}
        assert int(inner.state[m]["step"]) == 3


def test_loading_the_wrapped_optimizer_directly_keeps_the_scheduler_reaching_it():
    """``inner.load_state_dict`` after wrapping (an inner checkpoint, or
    torch.distributed.checkpoint given ``opt.optimizer``) replaces the inner optimizer's
    param_groups and state objects. The wrapper reads them live, so an LR scheduler on it
    still drives the learning rates: the run equals one without the reload, bitwise."""
    batches = token_batches(12, seed=12)

    def run(reload: bool) -> torch.nn.Module:
        model = make_model()
        inner = make_opt("adamw", model.parameters())
        opt = fo.wrap(inner, 2, model=model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
        for i, (x, y) in enumerate(batches):
            mean_loss(model, x, y).backward()
            if opt.step(num_items=len(y)):
                sched.step()
            if reload and i == 3:  # at a boundary
                inner.load_state_dict(copy.deepcopy(inner.state_dict()))
                assert opt.param_groups is inner.param_groups and opt.state is inner.state
        assert inner.param_groups[0]["lr"] == 1e-2 * 0.5**6
        return model

    for p, q in zip(run(True).parameters(), run(False).parameters(), strict=True):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------- resume


def test_resume_mid_window_is_bit_identical():
    batches = token_batches(14, seed=7)
    straight, s_opt = run_with_checkpoint(None, batches)
    resumed, r_opt = run_with_checkpoint(6, batches)  # 2 micro-batches into window 2
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert s_opt.micro_step == r_opt.micro_step == 2
    assert s_opt.stats() == r_opt.stats()


def test_a_boundary_checkpoint_holds_no_accumulators_and_resumes_bit_identically():
    """At a boundary every accumulator is zero: the state dict saves none (the checkpoint
    is the size of the optimizer state), and a resume there, with fused weight gradients
    too, is bit-identical to the run never stopped; mid-window they are saved."""
    batches = token_batches(12, seed=8)

    def fused_adamw(seed=0):
        model = fastaccum.fuse_wgrad(make_model(seed))
        inner = make_opt("adamw", model.parameters())
        return model, fo.wrap(inner, 4, model=model, max_grad_norm=1.0)

    for build in (None, fused_adamw):
        straight, _ = run_with_checkpoint(None, batches, build=build)
        resumed, _ = run_with_checkpoint(8, batches, build=build)  # at the boundary
        for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
            assert torch.equal(p, q)
    model, opt = run_with_checkpoint(None, batches[:8])
    assert opt.micro_step == 0
    assert opt.state_dict()["fastaccum"]["accums"] == [None] * len(list(model.parameters()))
    x, y = batches[8]
    mean_loss(model, x, y).backward()
    opt.step(num_items=len(y))
    saved = opt.state_dict()["fastaccum"]["accums"]
    accums = opt.window_accums()
    for p, a in zip(model.parameters(), saved, strict=True):
        assert torch.equal(a, accums[p])


def test_load_state_dict_from_other_configuration_changes_nothing():
    model = make_model()
    opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 4)
    x, y = token_batches(1)[0]
    mean_loss(model, x, y).backward()
    opt.step()
    other_model = torch.nn.Sequential(*make_model()[:-1], torch.nn.Linear(32, 7))
    other = fo.wrap(torch.optim.SGD(other_model.parameters(), lr=0.1), 4)
    sd = other.state_dict()
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"param_shapes is .*\(7, 32\)"):
        opt.load_state_dict(sd)
    assert opt.micro_step == 1
    after = opt.state_dict()
    for a, b in zip(after["fastaccum"]["accums"], before["fastaccum"]["accums"], strict=True):
        assert torch.equal(a, b)


def test_torch_optim_state_dict_from_before_wrapping_loads_and_continues_exactly():
    """A native checkpoint (model + torch.optim AdamW after two large-batch windows) loads
    into a wrapper, which then trains the remaining windows as the large batch does."""
    k = 4
    windows = split_windows(token_batches(4 * k, seed=21), k)
    want, _ = large_batch_run(lambda p: make_opt("adamw", p), windows)
    native, native_opt = large_batch_run(lambda p: make_opt("adamw", p), windows[:2])
    model = make_model(seed=5)
    model.load_state_dict(native.state_dict())
    opt = fo.wrap(make_opt("adamw", model.parameters()), k, model=model)
    opt.load_state_dict(native_opt.state_dict())
    assert opt.state is opt.optimizer.state and len(opt.state) == len(list(model.parameters()))
    for x, y in [b for w in windows[2:] for b in w]:
        mean_loss(model, x, y).backward()
        opt.step(num_items=len(y))
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def test_wrapper_state_dict_loads_into_plain_torch_optim_and_continues_exactly():
    """The reverse: a wrapper checkpoint after two windows loads into a plain AdamW (no
    wrapper), which trains the remaining windows as the large batch does. The wrapped
    optimizer's state is saved once, not twice, in that checkpoint."""
    k = 4
    windows = split_windows(token_batches(4 * k, seed=21), k)
    want, _ = large_batch_run(lambda p: make_opt("adamw", p), windows)
    model = make_model()
    opt = fo.wrap(make_opt("adamw", model.parameters()), k, model=model)
    for x, y in [b for w in windows[:2] for b in w]:
        mean_loss(model, x, y).backward()
        opt.step(num_items=len(y))
    sizes = []
    for state in (opt.state_dict(), opt.optimizer.state_dict()):
        buf = io.BytesIO()
        torch.save(state, buf)
        sizes.append(buf.tell())
    inner_bytes = sum(
        t.numel() * t.element_size()
        for st in opt.optimizer.state.values()
        for t in st.values()
        if torch.is_tensor(t)
    )
    assert sizes[0] - sizes[1] < inner_bytes  # the accumulators and counters, not a copy
    plain_model = make_model(seed=5)
    plain_model.load_state_dict(model.state_dict())
    plain = make_opt("adamw", plain_model.parameters())
    plain.load_state_dict(opt.state_dict())
    for batches in windows[2:]:
        total = sum(len(y) for _, y in batches)
        sum(mean_loss(plain_model, x, y) * len(y) / total for x, y in batches).backward()
        plain.step()
        plain.zero_grad()
    for p, q in zip(plain_model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def test_torch_optim_state_dict_refreshes_masters_and_drops_the_open_window():
    model = make_model(dtype=torch.bfloat16)
    opt = fo.wrap(make_opt("sgd", model.parameters()), 4, master_weights=True)
    native = make_opt("sgd", make_model(dtype=torch.bfloat16).parameters())
    x, y = token_batches(1)[0]
    mean_loss(model, x, y).backward()
    opt.step()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # as model.load_state_dict would change them
    with pytest.warns(RuntimeWarning, match="discarded the 1 micro-batch"):
        opt.load_state_dict(native.state_dict())
    assert opt.micro_step == 0
    assert all(not acc.any() for acc in opt._accums.values())
    for p, master in opt._masters.items():
        assert torch.equal(master, p.float())
    wrong = make_opt("sgd", make_model().parameters())
    wrong.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    with pytest.raises(ValueError):  # torch's own check: another number of groups
        opt.load_state_dict(wrong.state_dict())
    with pytest.raises(ValueError, match=r"nor a torch\.optim one"):
        opt.load_state_dict({"model": {}})


# --------------------------------------------------------------------------- AMP, non-finite


def test_grad_scaler_skips_a_window_with_inf_then_trains_normally():
    k = 2
    batches = token_batches(6, seed=8)
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=0.1), k, model=model, scaler=scaler)
    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for i, (x, y) in enumerate(batches):
        scaler.scale(mean_loss(model, x, y)).backward()
        if i == 2:  # inject an inf into the second window
            next(model.parameters()).grad[0, 0] = math.inf
        opt.step()
        opt.zero_grad()
        if i == 1:
            assert scaler.get_scale() == 1024.0  # held constant through the window
        if i not in (2, 3):
            (mean_loss(ref, x, y) / k).backward()
            if i % k == 1:
                ref_opt.step()
                ref_opt.zero_grad()
    s = opt.stats()
    assert s["skipped_windows"] == 1 and s["windows"] == 2
    assert scaler.get_scale() == 512.0  # one backoff, for the skipped window only
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def test_scaler_step_on_a_wrapper_given_the_scaler_is_refused():
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model, scaler=scaler)
    x, y = token_batches(1)[0]
    scaler.scale(mean_loss(model, x, y)).backward()
    with pytest.raises(RuntimeError, match="unscaled twice"):
        scaler.step(opt)
    assert opt.micro_step == 0
    assert opt.state_dict()["fastaccum"]["accums"] == [None] * len(list(model.parameters()))


def test_scaler_update_left_in_the_loop_is_refused_and_changes_nothing():
    """With ``scaler=`` the wrapper updates the scale; a habitual ``scaler.update()`` after
    each ``opt.step()`` gets a RuntimeError that says so (torch's own error is a bare
    assertion), and the run is bit-identical to the same loop without the call. A scale
    the caller sets explicitly still goes through, and the guarded scaler still pickles."""
    k, batches = 2, token_batches(6, seed=9)

    def run(call_update: bool) -> tuple[torch.nn.Module, torch.amp.GradScaler, dict]:
        model = make_model()
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
        opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=0.1), k, model=model, scaler=scaler)
        for x, y in batches:
            scaler.scale(mean_loss(model, x, y)).backward()
            opt.step()
            if call_update:
                with pytest.raises(RuntimeError, match=r"leave scaler.update\(\) out of the loop"):
                    scaler.update()
            opt.zero_grad()
        return model, scaler, opt.stats()

    model, scaler, stats = run(call_update=True)
    ref, ref_scaler, ref_stats = run(call_update=False)
    assert scaler.get_scale() == ref_scaler.get_scale() == 1024.0 * 2 ** (len(batches) // k)
    assert stats["windows"] == ref_stats["windows"] == len(batches) // k
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    scaler.update(64.0)
    assert scaler.get_scale() == 64.0
    buffer = io.BytesIO()
    torch.save(scaler, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.get_scale() == 64.0 and loaded.update.scaler is loaded


@pytest.mark.parametrize("path", ["step", "backward"])
def test_scaler_given_but_loss_never_scaled_is_refused(path):
    """``scaler=`` with an unscaled loss would divide the window by the initial scale
    (2**16): refused before anything is folded; scaling the loss then trains normally."""
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu")
    opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 1, model=model, scaler=scaler)
    x, y = token_batches(1)[0]
    with pytest.raises(RuntimeError, match=r"scaler.scale\(loss\) was never called"):
        if path == "step":
            mean_loss(model, x, y).backward()
            opt.step()
        else:
            opt.backward(mean_loss(model, x, y))
    assert opt.micro_step == 0 and opt.stats()["windows"] == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    opt.zero_grad()
    scaler.scale(mean_loss(model, x, y)).backward()
    assert opt.step()
    ref = make_model()
    mean_loss(ref, x, y).backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def test_scaler_step_each_micro_batch_without_scaler_argument_trains_exactly():
    """The habitual AMP loop, ``scaler.step(opt); scaler.update()`` on every micro-batch,
    with a wrapper that does not own the scaler: the scaler unscales each micro-batch
    before it is folded, so scale changes inside a window (growth every micro-step here)
    do not matter."""
    k = 3
    batches = token_batches(2 * k, seed=9)
    want, _ = large_batch_run(lambda p: make_opt("sgd", p), split_windows(batches, k))
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1)
    opt = fo.wrap(make_opt("sgd", model.parameters()), k, model=model)
    for x, y in batches:
        scaler.scale(mean_loss(model, x, y)).backward()
        scaler.step(opt, num_items=len(y))
        scaler.update()
        opt.zero_grad()
    assert scaler.get_scale() == 256.0 * 2 ** len(batches)
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def test_nonfinite_without_scaler_warns_and_changes_nothing():
    model = make_model()
    opt = fo.wrap(make_opt("adamw", model.parameters()), 2, model=model)
    x, y = token_batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    mean_loss(model, x, y).backward()
    opt.step()
    mean_loss(model, x, y).backward()
    model[1].weight.grad[0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match=r"1 parameter\(s\) \(1\.weight\)"):
        assert opt.step() is False
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert len(opt.optimizer.state) == 0  # AdamW never initialized its state
    assert opt.stats()["skipped_windows"] == 1
    assert all(
        torch.count_nonzero(a) == 0
        for a in opt.state_dict()["fastaccum"]["accums"]
        if a is not None
    )


# --------------------------------------------------------------------------- schedulers


@pytest.mark.parametrize("sched", ["cosine", "onecycle"])
def test_schedulers_follow_optimizer_steps(sched):
    def make_sched(o):
        if sched == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5)
        return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=6)

    model = make_model()
    opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 3)
    scheduler = make_sched(opt)
    ref_opt = torch.optim.SGD(make_model().parameters(), lr=0.1, momentum=0.9)
    ref_sched = make_sched(ref_opt)
    lrs, ref_lrs = [], []
    for x, y in token_batches(15, seed=9):
        mean_loss(model, x, y).backward()
        if opt.step():
            scheduler.step()
            ref_opt.step()
            ref_sched.step()
            ref_lrs.append(ref_opt.param_groups[0]["lr"])
            lrs.append(opt.optimizer.param_groups[0]["lr"])
    assert len(lrs) == 5
    assert lrs == pytest.approx(ref_lrs)
    assert len(set(lrs)) == 5  # the wrapped optimizer's lr really moved


# --------------------------------------------------------------------------- bad input


def test_bad_construction_arguments():
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="accum_steps must be >= 1, got 0"):
        fo.wrap(sgd, 0)
    with pytest.raises(TypeError, match=r"must be a torch\.optim\.Optimizer"):
        fo.wrap(model, 4)
    with pytest.raises(ValueError, match="is not a parameter of model"):
        fo.wrap(sgd, 4, model=make_model(seed=5))
    with pytest.raises(ValueError, match="max_grad_norm"):
        fo.wrap(sgd, 4, max_grad_norm=-1.0)
    with pytest.raises(TypeError, match=r"LBFGS\.step needs a closure"):
        fo.wrap(torch.optim.LBFGS(model.parameters()), 4)
    with pytest.raises(TypeError, match="is a SparseAdam, which steps on sparse gradients"):
        fo.wrap(torch.optim.SparseAdam(list(model.parameters())), 4)


def test_step_without_gradients_changes_nothing():
    model = make_model()
    opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 4)
    with pytest.raises(RuntimeError, match="found no gradients"):
        opt.step()
    assert opt.micro_step == 0


@pytest.mark.parametrize("bad", [0, -3, float("nan")])
def test_bad_num_items_changes_nothing(bad):
    model = make_model()
    opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 4)
    batches = token_batches(2, seed=10)
    x, y = batches[0]
    mean_loss(model, x, y).backward()
    opt.step(num_items=len(y))
    acc_before = [a.clone() for a in opt.state_dict()["fastaccum"]["accums"]]
    x, y = batches[1]
    mean_loss(model, x, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="num_items must be > 0"):
        opt.step(num_items=bad)
    assert opt.micro_step == 1
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)  # the user's gradients are still there
    for a, b in zip(opt.state_dict()["fastaccum"]["accums"], acc_before, strict=True):
        assert torch.equal(a, b)


def test_num_items_on_some_micro_batches_only_is_an_error():
    model = make_model()
    opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 4)
    (x, y), (x2, y2) = token_batches(2, seed=11)
    mean_loss(model, x, y).backward()
    opt.step(num_items=len(y))
    mean_loss(model, x2, y2).backward()
    with pytest.raises(ValueError, match="every micro-batch of a window or on none"):
        opt.step()
    assert opt.micro_step == 1


def test_is_an_optimizer_sharing_param_groups():
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=3e-4)
    opt = fo.wrap(inner, 2)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    opt.param_groups[0]["lr"] = 1e-3
    assert inner.param_groups[0]["lr"] == 1e-3
    assert opt.accum_steps == 2


def test_added_param_group_is_accumulated():
    model = make_model()
    extra = torch.nn.Parameter(torch.randn(5))
    opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2)
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert opt.optimizer.param_groups[-1]["params"][0] is extra
    before = extra.detach().clone()
    for x, y in token_batches(2, seed=12):
        (mean_loss(model, x, y) + extra.square().sum()).backward()
        opt.step()
    # d/dx sum(x^2) = 2x on both micro-batches; mean over the window is 2x; lr 0.5
    assert_close_rel(extra, before - 0.5 * 2 * before, 1e-6)


def test_parameter_without_gradient_in_a_window_is_not_stepped():
    """As torch.optim skips a parameter whose .grad is None, so does a window in which a
    parameter received no gradient, even though it has an accumulator from before."""
    model = make_model()
    extra = torch.nn.Parameter(torch.randn(4))
    opt = fo.wrap(torch.optim.AdamW([*model.parameters(), extra], lr=0.1), 2)
    (x, y), (x2, y2), (x3, y3), (x4, y4) = token_batches(4, seed=13)
    for xb, yb in ((x, y), (x2, y2)):  # window 1 uses extra
        (mean_loss(model, xb, yb) + extra.sum()).backward()
        opt.step()
    after_first = extra.detach().clone()
    for xb, yb in ((x3, y3), (x4, y4)):  # window 2 does not
        mean_loss(model, xb, yb).backward()
        opt.step()
    assert torch.equal(extra, after_first)  # AdamW momentum would have moved it


def test_load_state_dict_keeps_sharing_param_groups_with_the_wrapped_optimizer():
    model = make_model()
    opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2)
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state


def test_bf16_accumulators_without_masters_step_through_written_grads():
    """accum_dtype = the parameters' bf16: every accumulator is handed over as .grad in place
    (no separate written .grad), and the boundary still resets them."""
    model = make_model(dtype=torch.bfloat16)
    opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, accum_dtype=torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in token_batches(2, seed=14):
        mean_loss(model, x, y).backward()
        opt.step()
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    accums = opt.state_dict()["fastaccum"]["accums"]
    assert all(torch.count_nonzero(a) == 0 for a in accums if a is not None)


def test_bf16_params_with_fp32_accumulators_get_a_cast_grad():
    """bf16 parameters, fp32 accumulators, no masters: the window gradient is cast into a
    fresh bf16 .grad for the step (no accumulator is aliased)."""
    model = make_model(dtype=torch.bfloat16)
    ref = make_model(dtype=torch.bfloat16)
    opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2)
    grads = []
    for x, y in token_batches(2, seed=15):
        mean_loss(model, x, y).backward()
        grads.append([p.grad.double() for p in model.parameters()])
        opt.step()
    for p, q, g0, g1 in zip(model.parameters(), ref.parameters(), *grads, strict=True):
        assert_close_rel(p, (q.double() - 0.1 * (g0 + g1) / 2).bfloat16(), 1e-2)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.skipif(
    not _backend.has_extension(),
    reason="the bound is the native accumulate_'s, which allocates nothing; the float64 "
    "reference of a FASTACCUM_NO_EXT=1 install makes bucket-sized temporaries",
)
def test_opt_backward_holds_at_most_one_bucket_of_gradients():
    """opt.backward folds gradients as autograd finishes them, in buckets of
    bucket_bytes(device): the backward's peak holds one bucket, not the full set that
    loss.backward() + step() holds (which shows the measure can fail)."""
    from fastaccum.memory.peak import peak_bytes
    from fastaccum.optim.wrapper import bucket_bytes

    torch.manual_seed(0)
    layers = [torch.nn.Linear(512, 512, bias=False) for _ in range(12)]  # 1 MiB weights
    model = torch.nn.Sequential(*layers)
    x = torch.randn(2, 512)
    grad_set = sum(p.numel() * p.element_size() for p in model.parameters())
    limit = bucket_bytes(x.device)
    assert limit < grad_set / 3  # the model has several buckets' worth of gradients

    def peak_of(use_backward: bool) -> int:
        opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=0.0), 4, model=model)
        if use_backward:
            opt.backward(model(x).square().mean())  # first call creates the accumulators
        else:
            model(x).square().mean().backward()
        opt.step()
        loss = model(x).square().mean()
        if use_backward:
            peak, _ = peak_bytes(lambda: opt.backward(loss), x.device)
        else:
            peak, _ = peak_bytes(lambda: (loss.backward(), opt.step()), x.device)
        return peak

    one_layer = 512 * 512 * 4
    assert peak_of(True) <= limit + 2 * one_layer
    assert peak_of(False) >= grad_set


class FailingBackward:
    """While armed, backward raises at the GELU's output: after the head's and the
    LayerNorm's gradients are made, before the first Linear's and the embedding's."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.armed = False
        model[2].register_forward_hook(self._watch)

    def _watch(self, module, args, out):
        def boom(grad):
            if self.armed:
                raise RuntimeError("injected backward failure")

        out.register_hook(boom)


@pytest.mark.parametrize("route", ["bucket-folded", "fused-wgrad"])
def test_backward_failing_after_a_fold_discards_the_window(route, monkeypatch):
    """Part of the failed micro-batch already sits in the accumulators: the window is
    discarded with a warning, parameters and state stay, and training goes on exactly."""
    import fastaccum.optim.wrapper as wrapper_module

    k = 3
    data = token_batches(2 + 2 * k, seed=6)
    want, _ = large_batch_run(lambda p: make_opt("adamw", p), split_windows(data[2:], k))
    model = make_model()
    if route == "bucket-folded":  # every gradient is folded as soon as it is made
        monkeypatch.setitem(wrapper_module.BUCKET_BYTES, "cpu", 1)
    else:  # the fused head writes its accumulator directly
        fastaccum.fuse_wgrad(model, embeddings=False)
    failing = FailingBackward(model)
    opt = fastaccum.wrap(make_opt("adamw", model.parameters()), k, model=model)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data[0]
    opt.backward(mean_loss(model, x, y), num_items=len(y))
    opt.step()
    failing.armed = True
    x, y = data[1]
    with (
        pytest.warns(RuntimeWarning, match="window was discarded with its 1 earlier"),
        pytest.raises(RuntimeError, match="injected backward failure"),
    ):
        opt.backward(mean_loss(model, x, y), num_items=len(y))
    failing.armed = False
    assert opt.micro_step == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())
    for x, y in data[2:]:
        opt.backward(mean_loss(model, x, y), num_items=len(y))
        opt.step()
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def test_backward_failing_before_any_fold_keeps_the_window():
    """Nothing of the failed micro-batch reached an accumulator (its gradients were still
    waiting in the bucket): the window stays as it was, and a retry trains exactly."""
    k = 3
    data = token_batches(2 * k, seed=7)
    want, _ = large_batch_run(lambda p: make_opt("adamw", p), split_windows(data, k))
    model = make_model()
    failing = FailingBackward(model)
    opt = fastaccum.wrap(make_opt("adamw", model.parameters()), k, model=model)
    for i, (x, y) in enumerate(data):
        if i == 1:
            failing.armed = True
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no discard warning
                with pytest.raises(RuntimeError, match="injected backward failure"):
                    opt.backward(mean_loss(model, x, y), num_items=len(y))
            failing.armed = False
            assert opt.micro_step == 1
            assert all(p.grad is None for p in model.parameters())
        opt.backward(mean_loss(model, x, y), num_items=len(y))
        opt.step()
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


class FailsOnce(torch.optim.AdamW):
    """AdamW whose first step raises before it changes anything (a device error, say)."""

    failed = False

    def step(self, closure=None):
        if not self.failed:
            self.failed = True
            raise RuntimeError("injected step failure")
        return super().step(closure)


def test_failed_optimizer_step_discards_the_window_and_training_goes_on():
    """The window the failed step was handed (already scaled in place) is dropped, not
    stepped again with the next micro-batch; .grad is cleared and the next window trains
    exactly as the large batch."""
    k = 3
    data = token_batches(2 * k, seed=8)
    want, _ = large_batch_run(lambda p: make_opt("adamw", p), split_windows(data[k:], k))
    model = make_model()
    opt = fastaccum.wrap(FailsOnce(model.parameters(), lr=1e-2, weight_decay=0.1), k, model=model)
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in data[: k - 1]:
        mean_loss(model, x, y).backward()
        assert opt.step(num_items=len(y)) is False
    x, y = data[k - 1]
    mean_loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match="injected step failure") as failure:
        opt.step(num_items=len(y))
    assert "accumulated gradients were discarded" in "".join(failure.value.__notes__)
    assert opt.micro_step == 0
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert opt.stats()["windows"] == 0
    for x, y in data[k:]:
        mean_loss(model, x, y).backward()
        opt.step(num_items=len(y))
        opt.zero_grad()
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)
