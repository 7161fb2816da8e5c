"""``fastaccum.wrap([opt_a, opt_b], K)``: several optimizers share one window.

The reference is the native multi-optimizer loop on the concatenated batch of each
window (``large_batch_run`` given a list of optimizers): one backward, ``clip_grad_norm_``
over all of the model's parameters, then every optimizer steps. The split is the usual
Muon one: 2-D weights to one optimizer, the rest (LayerNorm, biases) to another.
"""

import copy
import math
import warnings

import pytest
import torch

import fastaccum
from tests.helpers import (
    assert_close_rel,
    by_shape,
    collector_off,
    large_batch_run,
    large_batch_windows,
    make_model,
    mean_loss,
    members_of,
    micro_step,
    resume,
    sgd_adamw,
    split_windows,
    token_batches,
)

K = 4
CLIP = 0.5  # well below the model's gradient norm: every window is clipped


def train(model, opt, batches, mode="step", sched=None):
    for x, y in batches:
        if micro_step(model, opt, x, y, mode) and sched is not None:
            sched.step()


class KernelCalls:
    """Counts the fused window-update kernel calls, passing each one on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import fastaccum.optim.fused as module

        self.calls = 0
        real = module.window_step_unchecked

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "window_step_unchecked", counted)


@pytest.mark.parametrize("kind", ["torch", "fused-adamw", "all-fused"])
@pytest.mark.parametrize("mode", ["step", "backward"])
@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fuse_wgrad"])
def test_one_window_for_all_optimizers_clipped_by_the_global_norm(mode, fuse, kind, monkeypatch):
    """Members may be fastaccum's fused classes: their kernels update their parameters at
    the list's boundary, and the state they keep is their torch.optim optimizer's."""
    batches = token_batches(3 * K + 2)  # 3 full windows and a partial one for flush()
    want, want_opts = large_batch_run(sgd_adamw, split_windows(batches, K), CLIP)
    model = make_model()
    if fuse:
        fastaccum.fuse_wgrad(model)
    members = members_of(kind)(model.parameters())
    opt = fastaccum.wrap(members, K, model=model, max_grad_norm=CLIP)
    kernel = KernelCalls(monkeypatch)
    train(model, opt, batches, mode)
    assert opt.micro_step == 2
    assert opt.flush() is True
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)
    assert opt.stats()["windows"] == 4
    assert opt.stats()["grad_norm"] > CLIP  # the clip acted on the global norm
    if fuse and mode == "backward":
        assert opt._fused_seen  # the Linear weights were written by the fused GEMM
    # one kernel call per member (one group, one step count) per window: a fused class's
    # own, or the fused update of a torch.optim SGD/AdamW member
    assert kernel.calls == 4 * 2
    for member, native in zip(opt.optimizer.optimizers, want_opts, strict=True):
        assert type(member) is type(native)
        got, ref = member.state_dict(), native.state_dict()
        assert ref["param_groups"] == got["param_groups"]
        torch.testing.assert_close(got["state"], ref["state"], rtol=1e-5, atol=1e-6)


def test_fused_members_that_cannot_join_are_refused_and_unchanged():
    """A fused class joins a list only fresh from construction or at a boundary, without
    the options that belong to the list's wrapper, and only once; a refused list changes
    none of them. A joined one takes no micro-batches of its own."""
    model = make_model()
    matrices, rest = by_shape(model.parameters())
    sgd = fastaccum.optim.SGD(matrices, lr=0.1, momentum=0.9)
    for bad, match in (
        (fastaccum.optim.AdamW(rest, max_grad_norm=1.0), "max_grad_norm=;"),
        (fastaccum.optim.AdamW(rest, model=model), "model=;"),
        (fastaccum.optim.AdamW(rest, master_weights=True), "master_weights=;"),
        (fastaccum.optim.AdamW(rest, accum_steps=3), "accum_steps=3, and the list"),
    ):
        with pytest.raises(ValueError, match=r"optimizers\[1\] \(AdamW\) was built with " + match):
            fastaccum.wrap([sgd, bad], K, model=model)
    busy = fastaccum.optim.AdamW(rest, accum_steps=K)
    x, y = token_batches(1)[0]
    micro_step(model, busy, x, y)
    with pytest.raises(ValueError, match=r"holds a partial window of 1 micro-batch"):
        fastaccum.wrap([sgd, busy], K, model=model)
    assert busy.micro_step == 1
    busy.flush()

    opt = fastaccum.wrap([sgd, busy], K, model=model)  # neither was marked by the refusals
    with pytest.raises(ValueError, match=r"already joined another"):
        fastaccum.wrap([sgd], K, model=model)
    mean_loss(model, x, y).backward()
    for call in (busy.step, busy.flush, lambda: busy.backward(mean_loss(model, x, y))):
        with pytest.raises(RuntimeError, match=r"joined fastaccum.wrap\(\[\.\.\.\]\)"):
            call()
    assert opt.micro_step == 0
    assert opt.step() is False  # the wrapper takes the micro-batch
    assert opt.micro_step == 1
    with collector_off():  # once that wrapper is dropped, its members are free again
        del opt
        fastaccum.wrap([sgd, busy], K, model=model)


def test_muon_gets_the_native_window_gradient():
    """torch.optim.Muon orthogonalizes in bf16, which turns float32 rounding into ~1e-3
    differences in the weights (and so in every later gradient). The exact check is on
    the first window: the gradient each member is handed must be the native loop's
    clipped window gradient (rel 1e-6). Later, the weights stay within bf16 distance."""
    batches = token_batches(2 * K)

    def muon_adamw(params):
        matrices, rest = by_shape(params)
        return [torch.optim.Muon(matrices, lr=1e-2), torch.optim.AdamW(rest, lr=1e-2)]

    def grads_seen(opts):
        """The gradients each member is handed, recorded when it steps."""
        seen = []
        for opt in opts:
            opt.register_step_pre_hook(
                lambda o, args, kwargs: seen.append(
                    [p.grad.clone() for g in o.param_groups for p in g["params"]]
                )
            )
        return seen

    ref = make_model()
    ref_opts = muon_adamw(ref.parameters())
    want = grads_seen(ref_opts)
    large_batch_windows(ref, ref_opts, split_windows(batches, K), CLIP)

    model = make_model()
    members = muon_adamw(model.parameters())
    got = grads_seen(members)
    opt = fastaccum.wrap(members, K, model=model, max_grad_norm=CLIP)
    train(model, opt, batches)
    assert len(got) == len(want) == 2 * 2  # two windows, each stepping both members
    assert [len(g) for g in got] == [len(w) for w in want] == [3, 4, 3, 4]
    for g, w in zip(got[:2], want[:2], strict=True):
        for a, b in zip(g, w, strict=True):
            assert_close_rel(a, b, 1e-6)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p, q, 2e-2)


@pytest.mark.parametrize("kind", ["torch", "all-fused"])
def test_scheduler_on_the_wrapper_drives_every_member(kind):
    """One LambdaLR on the wrapper equals one per member in the native loop: each group
    keeps its own base learning rate, and all move once per window (fused members' kernels
    read it too)."""
    batches = token_batches(3 * K, seed=3)

    def warmup(step):
        return min(1.0, (step + 1) / 3)

    want, want_opts = large_batch_run(
        sgd_adamw,
        split_windows(batches, K),
        CLIP,
        make_sched=lambda opts: [torch.optim.lr_scheduler.LambdaLR(o, warmup) for o in opts],
    )
    model = make_model()
    opt = fastaccum.wrap(members_of(kind)(model.parameters()), K, model=model, max_grad_norm=CLIP)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    train(model, opt, batches, sched=sched)
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)
    got_lrs = [g["lr"] for o in opt.optimizer.optimizers for g in o.param_groups]
    assert got_lrs == [g["lr"] for o in want_opts for g in o.param_groups] == [0.1, 1e-2]


def test_schedulers_built_on_members_fused_ones_too():
    """A scheduler on each member (the fused one's built on the fastaccum.optim.AdamW
    itself), stepped when the list's wrapper steps: the native loop's schedules, and no
    "lr_scheduler.step() before optimizer.step()" warning for the fused member."""
    batches = token_batches(3 * K, seed=4)

    def decay(step):
        return 0.5**step

    def schedules(opts):
        return [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in opts]

    want, _ = large_batch_run(sgd_adamw, split_windows(batches, K), CLIP, make_sched=schedules)
    model = make_model()
    members = members_of("fused-adamw")(model.parameters())
    scheds = schedules(members)
    opt = fastaccum.wrap(members, K, model=model, max_grad_norm=CLIP)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in batches:
            if micro_step(model, opt, x, y):
                for sched in scheds:
                    sched.step()
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)
    assert [m.param_groups[0]["lr"] for m in members] == [0.1 / 8, 1e-2 / 8]


def test_a_member_loaded_directly_stays_in_the_chain():
    """A member's own load_state_dict replaces its group dicts: the chain's param_groups
    and state read the members live, so the scheduler on the wrapper still drives it."""
    model = make_model()
    members = sgd_adamw(model.parameters())
    opt = fastaccum.wrap(members, K, model=model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    train(model, opt, token_batches(K, seed=4), sched=sched)
    members[0].load_state_dict(copy.deepcopy(members[0].state_dict()))
    assert opt.param_groups[0] is members[0].param_groups[0]
    assert opt.state[members[0].param_groups[0]["params"][0]] is next(
        iter(members[0].state.values())
    )
    sched.step()
    assert [g["lr"] for m in members for g in m.param_groups] == [0.1 * 0.25, 1e-2 * 0.25]


@pytest.mark.parametrize("kind", ["torch", "fused-adamw"])
def test_grad_scaler_skips_the_window_for_every_member(kind):
    """An inf in the Linear weights (an SGD member's) skips the window for the AdamW member
    too: both members' state and every parameter stay bitwise as they were, and the next
    window trains as the native loop's second window (a fused member unscales in its
    kernel)."""
    batches = token_batches(3 * K, seed=5)
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    opt = fastaccum.wrap(
        members_of(kind)(model.parameters()), K, model=model, max_grad_norm=CLIP, scaler=scaler
    )
    for i, (x, y) in enumerate(batches):
        if i == K:
            before = copy.deepcopy((model.state_dict(), opt.optimizer.state_dict()))
        scaler.scale(mean_loss(model, x, y)).backward()
        if i == K + 1:
            model[1].weight.grad[0, 0] = math.inf
        opt.step(num_items=len(y))
        opt.zero_grad()
        if i == 2 * K - 1:
            after = (model.state_dict(), opt.optimizer.state_dict())
            torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert opt.stats()["skipped_windows"] == 1 and opt.stats()["windows"] == 2
    assert scaler.get_scale() == 512.0
    windows = split_windows(batches, K)
    want, _ = large_batch_run(sgd_adamw, [windows[0], windows[2]], CLIP)
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


@pytest.mark.parametrize("kind", ["torch", "fused-adamw"])
def test_checkpoint_mid_window_resumes_bit_identically(kind):
    batches = token_batches(3 * K, seed=6)

    def build(seed=0):
        model = make_model(seed)
        return model, fastaccum.wrap(
            members_of(kind)(model.parameters()), K, model=model, max_grad_norm=CLIP
        )

    model, opt = build()
    train(model, opt, batches)
    model2, opt2 = build()
    train(model2, opt2, batches[: K + 2])
    model2, opt2 = resume(model2, opt2, lambda: build(seed=99))
    assert opt2.micro_step == 2
    train(model2, opt2, batches[K + 2 :])
    for p, q in zip(model2.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
    torch.testing.assert_close(
        opt2.optimizer.state_dict(), opt.optimizer.state_dict(), rtol=0, atol=0
    )
    assert opt2.stats() == opt.stats()


def test_checkpoint_of_the_native_optimizers_loads_into_the_wrapper():
    """A native two-optimizer run checkpointed after one window (each optimizer's own
    state dict), resumed under the wrapper as ``{"optimizers": [...]}``: the run goes on
    as the native one does."""
    batches = token_batches(3 * K, seed=9)
    windows = split_windows(batches, K)
    want, want_opts = large_batch_run(sgd_adamw, windows[:1], CLIP)
    saved = copy.deepcopy({"model": want.state_dict(), "opts": [o.state_dict() for o in want_opts]})
    large_batch_windows(want, want_opts, windows[1:], CLIP)
    model = make_model(seed=99)
    model.load_state_dict(saved["model"])
    opt = fastaccum.wrap(sgd_adamw(model.parameters()), K, model=model, max_grad_norm=CLIP)
    with pytest.raises(
        ValueError, match=r"1 param groups and this chain's optimizers have 2 \(1 \+ 1\)"
    ):
        opt.load_state_dict(saved["opts"][0])  # one member's alone
    with pytest.raises(ValueError, match=r"or a list of them \('optimizers'\)"):
        opt.load_state_dict({"opts": saved["opts"]})
    opt.load_state_dict({"optimizers": saved["opts"]})
    train(model, opt, batches[K:])
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def test_master_weights_and_state_reach_the_members():
    """A bf16 model and its optimizers resumed from an fp32 run's checkpoint (torch casts
    the optimizer state to bf16), then wrapped with fp32 masters: the state moves to the
    masters in fp32, each member updates the masters of its own parameters, ``opt.state``
    finds each parameter's state in its member, and the run follows the fp32 one."""
    batches = token_batches(3 * K, seed=7)
    windows = split_windows(batches, K)
    want, want_opts = large_batch_run(sgd_adamw, windows[:1])
    model = make_model(dtype=torch.bfloat16)
    model.load_state_dict(want.state_dict())
    members = sgd_adamw(model.parameters())
    for member, saved in zip(members, want_opts, strict=True):
        member.load_state_dict(copy.deepcopy(saved.state_dict()))
    sgd, adamw = members
    assert adamw.state[model[3].weight]["exp_avg"].dtype == torch.bfloat16
    opt = fastaccum.wrap(members, K, model=model, master_weights=True)
    train(model, opt, batches[K:])
    large_batch_windows(want, want_opts, windows[1:])
    assert all(p.dtype == torch.float32 for g in opt.param_groups for p in g["params"])
    assert len(opt.state) == len(sgd.state) + len(adamw.state) == 7
    for group, member, key in (
        (sgd.param_groups[0], sgd, "momentum_buffer"),
        (adamw.param_groups[0], adamw, "exp_avg"),
    ):
        for master in group["params"]:
            assert opt.state[master] is member.state[master]
            assert opt.state[master][key].dtype == torch.float32
    assert all(int(adamw.state[p]["step"]) == 3 for p in adamw.param_groups[0]["params"])
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        master = opt._masters[p]
        assert_close_rel(master, q, 2e-2)
        assert torch.equal(p, master.to(torch.bfloat16))


@pytest.mark.parametrize(
    ("members", "error", "match"),
    [
        (lambda m: [], ValueError, "optimizers is empty"),
        (
            lambda m: [sgd_adamw(m.parameters())[0], "adam"],
            TypeError,
            r"optimizers\[1\] must be a torch",
        ),
        (
            lambda m: [torch.optim.SGD(m.parameters(), lr=0.1), sgd_adamw(m.parameters())[1]],
            ValueError,
            r"in both optimizers\[0\] and optimizers\[1\]",
        ),
        (
            lambda m: [
                sgd_adamw(m.parameters())[0],
                torch.optim.LBFGS(by_shape(m.parameters())[1]),
            ],
            TypeError,
            r"optimizers\[1\]: LBFGS\.step needs a closure",
        ),
        (
            lambda m: [fastaccum.wrap(torch.optim.AdamW(m.parameters()), 2)],
            TypeError,
            r"optimizers\[0\] is already wrapped",
        ),
    ],
    ids=["empty", "not-an-optimizer", "shared-parameter", "closure", "wrapped"],
)
def test_bad_member_lists_are_refused(members, error, match):
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        fastaccum.wrap(members(model), K, model=model)
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)


def test_same_optimizer_twice_is_refused():
    model = make_model()
    sgd, _ = sgd_adamw(model.parameters())
    with pytest.raises(ValueError, match=r"optimizers\[1\] appears twice"):
        fastaccum.wrap([sgd, sgd], K, model=model)


def test_add_param_group_is_refused_and_changes_nothing():
    model = make_model()
    matrices, rest = by_shape(model.parameters())
    sgd = torch.optim.SGD(matrices, lr=0.1)
    opt = fastaccum.wrap([sgd, torch.optim.AdamW(rest[:2], lr=1e-2)], K, model=model)
    with pytest.raises(RuntimeError, match="cannot tell which one a new param group"):
        opt.add_param_group({"params": rest[2:]})
    with pytest.raises(RuntimeError, match="cannot tell which of its optimizers"):
        opt.optimizer.add_param_group({"params": rest[2:]})
    assert len(opt.param_groups) == 2 and len(sgd.param_groups) == 1
    assert opt.state_dict()["fastaccum"]["param_shapes"] == [
        tuple(p.shape) for p in [*matrices, *rest[:2]]
    ]


def test_a_refused_member_state_leaves_every_member_unchanged():
    """The second member's entry does not fit: the first member, which had already loaded
    its own, is put back, and the wrapper carries on as if nothing had been tried."""
    batches = token_batches(2 * K, seed=8)
    model = make_model()
    opt = fastaccum.wrap(sgd_adamw(model.parameters()), K, model=model, max_grad_norm=CLIP)
    train(model, opt, batches[:K])
    other = make_model(1)
    donor = fastaccum.wrap(sgd_adamw(other.parameters()), K, model=other, max_grad_norm=CLIP)
    train(other, donor, batches[K:])
    bad = donor.state_dict()
    bad["optimizer"]["param_groups"][1]["params"].pop()  # AdamW's group
    before = copy.deepcopy(opt.optimizer.state_dict())
    with pytest.raises(ValueError, match="refused its state; no optimizer of the chain"):
        opt.load_state_dict(bad)
    torch.testing.assert_close(opt.optimizer.state_dict(), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="holds 1 optimizers' states and this chain has 2"):
        opt.load_state_dict({**bad, "optimizer": {"optimizers": [bad["optimizer"]]}})
    train(model, opt, batches[K:])
    want, _ = large_batch_run(sgd_adamw, split_windows(batches, K), CLIP)
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def test_one_cycle_sees_only_the_shared_defaults():
    """OneCycleLR cycles momentum only when the optimizer's defaults name it: two Adam-like
    members with equal betas expose them, SGD + AdamW expose no momentum key."""
    model = make_model()
    matrices, rest = by_shape(model.parameters())
    both_adam = fastaccum.optim.ChainedOptimizer(
        [torch.optim.Adam(matrices, lr=1e-3), torch.optim.AdamW(rest, lr=1e-3)]
    )
    assert both_adam.defaults["betas"] == (0.9, 0.999) and "weight_decay" not in both_adam.defaults
    torch.optim.lr_scheduler.OneCycleLR(both_adam, max_lr=1e-2, total_steps=10)
    assert [g["betas"][0] for g in both_adam.param_groups] == [0.95, 0.95]
    mixed = fastaccum.optim.ChainedOptimizer(sgd_adamw(make_model().parameters()))
    with pytest.raises(ValueError, match="momentum"):
        torch.optim.lr_scheduler.OneCycleLR(mixed, max_lr=1e-2, total_steps=10)


def test_add_note_keeps_the_error_where_python_has_no_notes():
    """fastaccum's notes on a failed window or state load: added where the error takes
    notes (Python 3.11+), and no AttributeError in place of the error where it does not
    (Python 3.10, which the package supports)."""
    import types

    from fastaccum.optim.chained import add_note

    err = ValueError("refused")
    add_note(err, "fastaccum: explained")
    assert err.__notes__ == ["fastaccum: explained"]
    without_notes = types.SimpleNamespace()  # like a 3.10 exception: no add_note
    add_note(without_notes, "fastaccum: explained")  # type: ignore[arg-type]
    assert vars(without_notes) == {}
