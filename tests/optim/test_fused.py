"""fastaccum.optim.SGD / Adam / AdamW(..., accum_steps=K): K micro-batches train exactly like
torch.optim's own class on the concatenated batch.

References are independent of fastaccum: torch.optim.SGD/Adam/AdamW stepping once per
window on the mean loss over every token of the window (one backward over all items).
"""

import copy
import math

import pytest
import torch

import fastaccum
import fastaccum.optim as fo
from tests.helpers import (
    OPTIM_KINDS,
    assert_close_rel,
    large_batch_run,
    large_batch_windows,
    make_model,
    mean_loss,
    resume,
    run_with_checkpoint,
    token_batches,
)
from tests.helpers import split_windows as windows_of


def torch_run(kind, windows, max_grad_norm=None, make_sched=None, **options):
    """torch.optim's own class, one big batch per window (``options`` override the test
    settings). Returns (model, optimizer)."""
    return large_batch_run(
        lambda params: getattr(torch.optim, kind)(params, **{**OPTIM_KINDS[kind], **options}),
        windows,
        max_grad_norm,
        make_sched,
    )


def fused_run(kind, batches, k, max_grad_norm=None, model=None, **options):
    """fastaccum's class, one micro-batch per step(); flush() on a partial last window."""
    model = model or make_model()
    opt = getattr(fo, kind)(
        model.parameters(),
        accum_steps=k,
        max_grad_norm=max_grad_norm,
        model=model,
        **{**OPTIM_KINDS[kind], **options},
    )
    stepped = []
    for x, y in batches:
        mean_loss(model, x, y).backward()
        stepped.append(opt.step(num_items=len(y)))
        opt.zero_grad()
    return model, opt, stepped


@pytest.mark.parametrize("kind", list(OPTIM_KINDS))
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_matches_torch_optim_on_the_big_batch(kind, max_grad_norm):
    k = 4
    batches = token_batches(4 * k - 2, seed=2)  # 3 full windows, then a partial one
    want, want_opt = torch_run(kind, windows_of(batches, k), max_grad_norm)

    model, opt, stepped = fused_run(kind, batches, k, max_grad_norm)
    assert stepped == [(i + 1) % k == 0 for i in range(len(batches))]
    assert opt.flush() is True

    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)
    # The state is torch.optim's own, in its own format.
    assert type(opt.optimizer) is getattr(torch.optim, kind)
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        mine, theirs = opt.state[p], want_opt.state[q]
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            assert mine[key].dtype == value.dtype and mine[key].device == value.device
            if key == "step":
                assert mine[key].item() == value.item() == 4
            else:
                assert_close_rel(mine[key], value, 1e-5)
    assert opt.stats()["windows"] == 4


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_amsgrad_matches_torch_optim_on_the_big_batch(kind):
    """amsgrad=True, with a small beta2 so that the second moment falls and the running
    maximum decides the denominator: parameters and the whole state (max_exp_avg_sq
    included) equal torch's class on the big batch, and differ from the run without."""
    k, options = 4, {"amsgrad": True, "betas": (0.9, 0.5)}
    batches = token_batches(4 * k, seed=21)
    want, want_opt = torch_run(kind, windows_of(batches, k), 0.5, **options)
    model, opt, _ = fused_run(kind, batches, k, 0.5, **options)
    plain, _, _ = fused_run(kind, batches, k, 0.5, betas=(0.9, 0.5))

    differs = 0.0
    for p, q, r in zip(model.parameters(), want.parameters(), plain.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)
        differs = max(differs, ((r - q).norm() / q.norm()).item())
    assert differs > 1e-3  # the maximum changed the updates
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        mine, theirs = opt.state[p], want_opt.state[q]
        assert mine.keys() == theirs.keys() and "max_exp_avg_sq" in mine
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert_close_rel(mine[key], theirs[key], 1e-5)


def test_amsgrad_switched_on_after_the_first_window_starts_its_maxima():
    """A group switched to amsgrad after its state exists gets max_exp_avg_sq from zeros
    (torch.optim's Adam raises KeyError there): the first window after the switch equals
    plain Adam, and later windows track the maximum, as a torch.optim.Adam(amsgrad=True)
    given zero maxima at that point does."""
    k = 2
    batches = token_batches(3 * k, seed=23)
    model, opt, _ = fused_run("Adam", batches[:k], k, betas=(0.9, 0.5))
    want = make_model()  # not a deepcopy, which would copy the wrapper's hooks too
    want.load_state_dict(model.state_dict())
    want_opt = torch.optim.Adam(want.parameters(), **{**OPTIM_KINDS["Adam"], "betas": (0.9, 0.5)})
    want_opt.load_state_dict(copy.deepcopy(opt.optimizer.state_dict()))  # no shared tensors
    opt.param_groups[0]["amsgrad"] = True
    want_opt.param_groups[0]["amsgrad"] = True
    for p in want.parameters():
        want_opt.state[p]["max_exp_avg_sq"] = torch.zeros_like(p)
    large_batch_windows(want, want_opt, windows_of(batches[k:], k))
    for x, y in batches[k:]:
        mean_loss(model, x, y).backward()
        opt.step(num_items=len(y))
        opt.zero_grad()
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)
        assert_close_rel(opt.state[p]["max_exp_avg_sq"], want_opt.state[q]["max_exp_avg_sq"], 1e-5)


def test_amsgrad_resumes_mid_window_bit_identically():
    batches = token_batches(10, seed=22)

    def make(seed=0):
        model = make_model(seed)
        opt = fo.AdamW(
            model.parameters(),
            lr=1e-2,
            betas=(0.9, 0.5),
            amsgrad=True,
            accum_steps=4,
            model=model,
            max_grad_norm=1.0,
        )
        return model, opt

    straight, _ = run_with_checkpoint(None, batches, build=make)
    resumed, opt = run_with_checkpoint(6, batches, build=make)
    for p, q in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q)
    assert all("max_exp_avg_sq" in opt.state[p] for p in resumed.parameters())


def test_accumulators_are_reset_and_no_grad_is_left():
    model, opt, _ = fused_run("AdamW", token_batches(4, seed=3), 2)
    assert all(p.grad is None for p in model.parameters())
    assert opt._accums  # the window's accumulators, kept for the next window
    assert all(torch.count_nonzero(a).item() == 0 for a in opt._accums.values())
    assert opt.state_dict()["fastaccum"]["accums"] == [None] * len(opt._params)  # not saved


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_other_backends_train_the_same(monkeypatch, backend):
    """The whole loop on the reference or the Triton kernels (interpreted without a GPU)
    matches the default backend."""
    if backend == "triton":
        pytest.importorskip("triton")
        if not fastaccum._backend.triton_can_run(torch.device("cpu")):
            pytest.skip("Triton cannot run on CPU tensors without TRITON_INTERPRET=1")
    batches = token_batches(6, seed=4)
    default, _, _ = fused_run("AdamW", batches, 3, max_grad_norm=1.0)
    monkeypatch.setenv("FASTACCUM_BACKEND", backend)
    other, _, _ = fused_run("AdamW", batches, 3, max_grad_norm=1.0)
    for p, q in zip(other.parameters(), default.parameters(), strict=True):
        assert_close_rel(p, q, 1e-6)


def test_default_accum_steps_is_a_plain_optimizer():
    """Without accum_steps the class steps on every call, like torch.optim.SGD."""
    batches = token_batches(3, seed=5)
    model = make_model()
    opt = fo.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches:
        mean_loss(model, x, y).backward()
        assert opt.step() is True
        opt.zero_grad()
        mean_loss(ref, x, y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p, q, 1e-6)


def test_parameters_joining_later_keep_their_own_step_count():
    """A parameter first used in window 2 starts its Adam state there, as in torch."""
    torch.manual_seed(6)
    w = torch.nn.Parameter(torch.randn(4, 3))
    head = torch.nn.Parameter(torch.randn(3))
    ref_w, ref_head = (torch.nn.Parameter(t.detach().clone()) for t in (w, head))
    opt = fo.Adam([w, head], lr=0.05, accum_steps=2)
    ref_opt = torch.optim.Adam([ref_w, ref_head], lr=0.05)
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(5, 4, generator=gen) for _ in range(6)]

    def loss(x, w, head, window):
        h = x @ w
        return h.square().mean() + (h @ head).sin().mean() if window > 0 else h.square().mean()

    for window in range(3):
        pair = xs[2 * window : 2 * window + 2]
        for x in pair:
            loss(x, w, head, window).backward()
            opt.step()
        (sum(loss(x, ref_w, ref_head, window) for x in pair) / 2).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert opt.state[w]["step"].item() == 3 and opt.state[head]["step"].item() == 2
    assert_close_rel(w, ref_w, 1e-5)
    assert_close_rel(head, ref_head, 1e-5)


def test_add_param_group_trains_like_torch():
    """A group added after construction (own lr) is accumulated and stepped, as in torch."""
    k = 2
    batches = token_batches(6, seed=15)
    models = make_model(), make_model()
    ours = fo.Adam(models[0][:2].parameters(), lr=1e-2, accum_steps=k)
    ours.add_param_group({"params": models[0][2:].parameters(), "lr": 3e-3})
    theirs = torch.optim.Adam(models[1][:2].parameters(), lr=1e-2)
    theirs.add_param_group({"params": models[1][2:].parameters(), "lr": 3e-3})
    for x, y in batches:
        mean_loss(models[0], x, y).backward()
        ours.step(num_items=len(y))
        ours.zero_grad()
    for window in windows_of(batches, k):
        x, y = torch.cat([b[0] for b in window]), torch.cat([b[1] for b in window])
        mean_loss(models[1], x, y).backward()
        theirs.step()
        theirs.zero_grad()
    for p, q in zip(*(m.parameters() for m in models), strict=True):
        assert_close_rel(p, q, 1e-5)
    with pytest.raises(TypeError, match="float32"):
        ours.add_param_group({"params": [torch.nn.Parameter(torch.ones(3, dtype=torch.float16))]})
    assert len(ours.param_groups) == 2


# --------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip_mid_window_is_bit_identical():
    batches = token_batches(10, seed=8)
    straight, s_opt, _ = fused_run("AdamW", batches, 3, max_grad_norm=1.0)

    model = make_model()
    opt = fo.AdamW(model.parameters(), accum_steps=3, max_grad_norm=1.0, **OPTIM_KINDS["AdamW"])
    for i, (x, y) in enumerate(batches):
        if i == 5:  # two micro-batches into window 2

            def build():
                model = make_model(seed=99)
                return model, fo.AdamW(
                    model.parameters(), accum_steps=3, max_grad_norm=1.0, **OPTIM_KINDS["AdamW"]
                )

            model, opt = resume(model, opt, build)
        mean_loss(model, x, y).backward()
        opt.step(num_items=len(y))
        opt.zero_grad()
    for p, q in zip(model.parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt.stats() == s_opt.stats()


def test_inner_state_loads_into_torch_optim():
    """The state a fused optimizer built is torch's format: torch.optim.AdamW continues it."""
    batches = token_batches(4, seed=9)
    model, opt, _ = fused_run("AdamW", batches, 2)
    twin = make_model()
    twin.load_state_dict(model.state_dict())
    # torch's load_state_dict keeps the tensors it is given: each load gets its own copy.
    torch_opt = torch.optim.AdamW(twin.parameters(), **OPTIM_KINDS["AdamW"])
    torch_opt.load_state_dict(copy.deepcopy(opt.optimizer.state_dict()))
    fused_next = fo.AdamW(model.parameters(), accum_steps=1, **OPTIM_KINDS["AdamW"])
    fused_next.optimizer.load_state_dict(copy.deepcopy(opt.optimizer.state_dict()))
    x, y = token_batches(1, seed=10)[0]
    for m, o in ((model, fused_next), (twin, torch_opt)):
        mean_loss(m, x, y).backward()
        o.step()
        o.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert_close_rel(p, q, 1e-6)


# --------------------------------------------------------------------------- schedulers


def test_lr_scheduler_drives_the_fused_step():
    k = 3
    batches = token_batches(5 * k, seed=11)

    def make_sched(o):
        return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4)

    want, _ = torch_run("SGD", windows_of(batches, k), make_sched=make_sched)
    model = make_model()
    opt = fo.SGD(model.parameters(), accum_steps=k, **OPTIM_KINDS["SGD"])
    sched = make_sched(opt)
    lrs = []
    for x, y in batches:
        mean_loss(model, x, y).backward()
        if opt.step(num_items=len(y)):
            lrs.append(opt.param_groups[0]["lr"])
            sched.step()
        opt.zero_grad()
    assert len(set(lrs)) == 5  # the learning rate really moved between windows
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def test_scheduler_still_drives_the_step_after_load_state_dict():
    model = make_model()
    opt = fo.AdamW(model.parameters(), accum_steps=2, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch replaces its group dicts
    for x, y in token_batches(2, seed=14):
        mean_loss(model, x, y).backward()
        stepped = opt.step()
    assert stepped
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.5
    assert opt.param_groups is opt.optimizer.param_groups


def test_grad_scaler_is_unscaled_in_the_fused_step():
    k = 2
    batches = token_batches(4, seed=13)
    want, _ = torch_run("SGD", windows_of(batches, k))
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = fo.SGD(model.parameters(), accum_steps=k, scaler=scaler, **OPTIM_KINDS["SGD"])
    for x, y in batches:
        scaler.scale(mean_loss(model, x, y)).backward()
        opt.step(num_items=len(y))
        opt.zero_grad()
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


# --------------------------------------------------------------------------- errors


def test_nonfinite_window_is_skipped_and_state_untouched():
    model = make_model()
    opt = fo.AdamW(model.parameters(), accum_steps=2, model=model)
    before = [p.detach().clone() for p in model.parameters()]
    (x, y), (x2, y2) = token_batches(2, seed=12)
    mean_loss(model, x, y).backward()
    opt.step()
    mean_loss(model, x2, y2).backward()
    model[1].weight.grad[0, 0] = math.inf
    with pytest.warns(RuntimeWarning, match="window was skipped"):
        assert opt.step() is False
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert len(opt.optimizer.state) == 0


@pytest.mark.parametrize(
    ("kind", "options", "exc", "match"),
    [
        ("AdamW", {"capturable": True}, ValueError, "capturable"),
        ("SGD", {"differentiable": True}, ValueError, "differentiable"),
        ("SGD", {"accum_steps": 0}, ValueError, "accum_steps must be >= 1, got 0"),
        ("Adam", {"lr": -1.0}, ValueError, "Invalid learning rate"),
        ("AdamW", {"max_grad_norm": -1.0}, ValueError, "max_grad_norm"),
    ],
)
def test_bad_arguments(kind, options, exc, match):
    with pytest.raises(exc, match=match):
        getattr(fo, kind)(make_model().parameters(), **options)


def test_parameters_must_be_fp32_and_dense():
    with pytest.raises(TypeError, match=r"needs float32 parameters.*master_weights=True"):
        fo.AdamW(make_model().bfloat16().parameters())
    with pytest.raises(
        TypeError, match=r"float64 parameters use fastaccum\.wrap\(torch\.optim\.Adam\("
    ):
        fo.Adam(make_model().double().parameters())
    gaps = torch.nn.Parameter(torch.randn(4, 6)[:, ::2])  # a view with gaps
    with pytest.raises(ValueError, match=r"needs dense parameters .* stride \(6, 2\)"):
        fo.SGD([gaps], lr=0.1)
    fo.SGD([torch.nn.Parameter(torch.randn(4, 3).t())], lr=0.1)  # transposed: dense


def bf16_run(kind: str, fused: bool, batches, k: int, stop=None, **extra):
    """A bf16 token model trained with fp32 masters: fastaccum's fused class, or
    fastaccum.wrap of torch's own; resumed from a checkpoint before micro-batch ``stop``.
    ``extra`` overrides the optimizer settings."""
    settings = {**OPTIM_KINDS[kind], **extra}

    def make(seed=0):
        model = make_model(seed, dtype=torch.bfloat16)
        options = {"max_grad_norm": 0.5, "master_weights": True}
        if fused:
            opt = getattr(fo, kind)(model.parameters(), accum_steps=k, **options, **settings)
        else:
            inner = getattr(torch.optim, kind)(model.parameters(), **settings)
            opt = fastaccum.wrap(inner, k, **options)
        return model, opt

    return run_with_checkpoint(stop, batches, build=make)


@pytest.mark.parametrize("kind", list(OPTIM_KINDS))
def test_master_weights_update_fp32_masters_in_the_fused_step(kind):
    """bf16 parameters with master_weights=True: one window's fused update of the fp32
    masters equals the unfused wrapper's torch.optim step on the same masters (rel 1e-6),
    the state is fp32 on the masters, and the model holds the masters cast to bf16."""
    k = 4
    batches = token_batches(k, seed=11)
    model, opt = bf16_run(kind, True, batches, k)
    _, want_opt = bf16_run(kind, False, batches, k)
    masters = [p for g in opt.param_groups for p in g["params"]]
    want_masters = [p for g in want_opt.param_groups for p in g["params"]]
    assert opt.stats()["windows"] == 1 and opt.stats()["grad_norm"] > 0.5  # clipped
    for p, m, q in zip(model.parameters(), masters, want_masters, strict=True):
        assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
        assert_close_rel(m, q, 1e-6)
        assert torch.equal(p, m.bfloat16())
        for key, value in want_opt.state[q].items():
            assert opt.state[m][key].dtype == value.dtype
            assert_close_rel(opt.state[m][key].float(), value.float(), 1e-6)


def test_master_weights_with_amsgrad_match_the_unfused_wrapper():
    """amsgrad on fp32 masters of a bf16 model, over 3 windows: masters and maxima equal
    the unfused wrapper's torch.optim.AdamW(amsgrad=True) on the same masters (rel 1e-6)."""
    k, extra = 4, {"amsgrad": True, "betas": (0.9, 0.5)}
    batches = token_batches(3 * k, seed=13)
    _, opt = bf16_run("AdamW", True, batches, k, **extra)
    _, want_opt = bf16_run("AdamW", False, batches, k, **extra)
    masters = [p for g in opt.param_groups for p in g["params"]]
    want_masters = [p for g in want_opt.param_groups for p in g["params"]]
    for m, q in zip(masters, want_masters, strict=True):
        assert_close_rel(m, q, 1e-6)
        assert_close_rel(opt.state[m]["max_exp_avg_sq"], want_opt.state[q]["max_exp_avg_sq"], 1e-6)


def test_master_weights_train_like_fp32_and_resume_bit_identically():
    """Several windows of the fused AdamW on a bf16 model with fp32 masters follow the fp32
    large-batch run as closely as the unfused wrapper does, and a checkpoint taken mid-window
    (masters included) resumes bit-identically."""
    k = 4
    batches = token_batches(3 * k, seed=12)
    want, _ = torch_run("AdamW", windows_of(batches, k), 0.5)
    model, opt = bf16_run("AdamW", True, batches, k)
    _, unfused_opt = bf16_run("AdamW", False, batches, k)

    def error(opt):
        masters = [p for g in opt.param_groups for p in g["params"]]
        return max(
            float((m - q).detach().norm() / q.detach().norm())
            for m, q in zip(masters, want.parameters(), strict=True)
        )

    assert error(opt) < 2e-2
    assert error(opt) == pytest.approx(error(unfused_opt), rel=1e-3)
    resumed, resumed_opt = bf16_run("AdamW", True, batches, k, stop=k + 2)
    for p, q in zip(resumed.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
    for m, q in zip(resumed_opt._masters.values(), opt._masters.values(), strict=True):
        assert torch.equal(m, q)


def test_is_an_accumulating_optimizer():
    model = make_model()
    opt = fo.Adam(model.parameters(), lr=3e-4, accum_steps=4)
    assert isinstance(opt, fastaccum.AccumulatingOptimizer)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.accum_steps == 4


def test_wrapping_a_fused_class_points_to_using_it_directly():
    opt = fo.AdamW(make_model().parameters(), accum_steps=2)
    with pytest.raises(TypeError, match=r"fastaccum\.optim\.AdamW, which accumulates by itself"):
        fastaccum.wrap(opt, 2)
    assert opt.micro_step == 0 and not opt._joined
