"""``fastaccum.wrap`` around ``torch.optim.SGD``/``Adam``/``AdamW`` runs each window's
update in the fused kernel (``fused_update``: by default for CPU parameters) where that
gives what the
optimizer's own ``step()`` would, and falls back to ``step()`` where it might not.

References: plain torch on the large batch (rel 1e-5), the same wrapper with
``fused_update=False`` (torch's step on the same accumulated window), and the
``fastaccum.optim`` class of the same name, which runs the same kernel (bit for bit)."""

import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import fastaccum
from tests.helpers import (
    OPTIM_KINDS,
    assert_close_rel,
    by_shape,
    large_batch_run,
    make_model,
    mean_loss,
    members_of,
    micro_step,
    sgd_adamw,
    split_windows,
    token_batches,
)

K = 4
# Every option the fused kernels implement, away from its default.
SETTINGS = {
    "SGD": OPTIM_KINDS["SGD"],
    "SGD-plain": {"lr": 0.1},
    "SGD-dampened": {"lr": 0.1, "momentum": 0.9, "dampening": 0.3, "maximize": True},
    "Adam": OPTIM_KINDS["Adam"],
    "Adam-amsgrad": {"lr": 1e-2, "amsgrad": True, "maximize": True, "eps": 1e-6},
    "AdamW": OPTIM_KINDS["AdamW"],
    "AdamW-amsgrad": {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.3},
}


def torch_class(kind: str) -> type[torch.optim.Optimizer]:
    return getattr(torch.optim, kind.split("-")[0])


def build(kind: str, **wrap_kwargs):
    model = make_model()
    inner = torch_class(kind)(model.parameters(), **SETTINGS[kind])
    return model, fastaccum.wrap(inner, K, model=model, max_grad_norm=1.0, **wrap_kwargs)


def train(model, opt, batches, mode="step") -> list[bool]:
    """The micro-batches through ``opt``; returns stats()["fused_update"] per window."""
    taken = []
    for x, y in batches:
        if micro_step(model, opt, x, y, mode):
            taken.append(opt.stats()["fused_update"])
    if opt.flush():
        taken.append(opt.stats()["fused_update"])
    return taken


@pytest.mark.parametrize("mode", ["step", "backward"])
@pytest.mark.parametrize("kind", sorted(SETTINGS))
def test_fused_update_trains_as_the_large_batch_and_as_torchs_step(kind, mode):
    batches = token_batches(3 * K + 2)  # three windows and a partial one
    model, opt = build(kind)
    assert opt.fused_update is None  # the default: fused on the CPU
    assert opt.stats()["fused_update"] is None
    assert train(model, opt, batches, mode) == [True] * 4
    stepped_model, stepped = build(kind, fused_update=False)
    assert train(stepped_model, stepped, batches, mode) == [False] * 4
    ref_model, ref_opt = large_batch_run(
        lambda params: torch_class(kind)(params, **SETTINGS[kind]),
        split_windows(batches, K),
        max_grad_norm=1.0,
    )
    for p, q, r in zip(
        model.parameters(), stepped_model.parameters(), ref_model.parameters(), strict=True
    ):
        assert_close_rel(p, r, 1e-5)
        assert_close_rel(p, q, 1e-6)
    # The optimizer state is torch's own: the same keys, dtypes, devices and values.
    theirs = ref_opt.state_dict()["state"]
    ours = opt.optimizer.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for index, state in theirs.items():
        assert ours[index].keys() == state.keys()
        for key, value in state.items():
            mine = ours[index][key]
            assert (mine.dtype, mine.device, mine.shape) == (value.dtype, value.device, value.shape)
            assert_close_rel(mine, value, 1e-5)


@pytest.mark.parametrize("kind", ["SGD", "AdamW-amsgrad"])
def test_fused_update_is_bit_identical_to_the_fused_class(kind):
    """wrap(torch.optim.X) and fastaccum.optim.X run the same kernels on the same window."""
    batches = token_batches(2 * K + 1)
    model, opt = build(kind)
    train(model, opt, batches)
    fused_model = make_model()
    cls = getattr(fastaccum.optim, torch_class(kind).__name__)
    fused = cls(
        fused_model.parameters(),
        accum_steps=K,
        max_grad_norm=1.0,
        model=fused_model,
        **SETTINGS[kind],
    )
    train(fused_model, fused, batches)
    for p, q in zip(model.parameters(), fused_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_inner_optimizer_continues_on_its_own():
    """After fused windows, the wrapped AdamW steps by itself (torch's code, torch's state)
    exactly as one that ran torch's step all along."""
    batches = token_batches(2 * K)
    runs = []
    for fused_update in (True, False):
        model, opt = build("AdamW-amsgrad", fused_update=fused_update)
        train(model, opt, batches)
        inner = opt.optimizer
        del opt
        for x, y in token_batches(3, seed=5):
            mean_loss(model, x, y).backward()
            inner.step()
            inner.zero_grad()
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert_close_rel(p, q, 1e-6)


def test_master_weights_take_the_fused_update():
    """bf16 parameters with fp32 masters: fused; equal to torch's step on the masters."""
    batches = token_batches(2 * K)
    models = []
    for fused_update in (True, False):
        model = make_model(dtype=torch.bfloat16)
        opt = fastaccum.wrap(
            torch.optim.AdamW(model.parameters(), lr=1e-2),
            K,
            model=model,
            master_weights=True,
            fused_update=fused_update,
        )
        assert train(model, opt, batches) == [fused_update] * 2
        models.append((model, opt))
    (model, opt), (ref_model, ref_opt) = models
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert_close_rel(opt._masters[p], ref_opt._masters[q], 1e-6)
        assert torch.equal(p, opt._masters[p].to(torch.bfloat16))


class MyAdamW(torch.optim.AdamW):
    """A subclass: its step may do more than AdamW's."""

    def step(self, closure=None):
        self.calls = getattr(self, "calls", 0) + 1
        return super().step(closure)


def _hooked(params):
    opt = torch.optim.AdamW(params, lr=1e-2)
    opt.seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: o.seen.append(o.param_groups[0]["lr"]))
    return opt


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda params: MyAdamW(params, lr=1e-2), id="subclass"),
        pytest.param(_hooked, id="step-hook-on-the-optimizer"),
        pytest.param(lambda params: torch.optim.RMSprop(params, lr=1e-2), id="RMSprop"),
    ],
)
def test_torchs_step_runs_where_the_fused_update_might_differ(make):
    batches = token_batches(2 * K)
    model = make_model()
    inner = make(model.parameters())
    opt = fastaccum.wrap(inner, K, model=model)
    assert train(model, opt, batches) == [False, False]
    if isinstance(inner, MyAdamW):
        assert inner.calls == 2
    if hasattr(inner, "seen"):
        assert inner.seen == [1e-2, 1e-2]


@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
def test_capturable_and_differentiable_groups_are_left_to_torch(flag):
    """(torch's step cannot run either on CPU parameters inside a wrapper, so the choice
    is checked where it is made, on a window of real accumulators.)"""
    model, opt = build("AdamW")
    for x, y in token_batches(K - 1):
        micro_step(model, opt, x, y)
    assert opt._fusable_window()
    opt.param_groups[0][flag] = True
    assert not opt._fusable_window()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_parameters_the_kernel_does_not_take_get_torchs_step(dtype):
    """bf16 parameters without masters (torch steps them in bf16) and float64 ones."""
    batches = token_batches(K)
    model = make_model(dtype=dtype)
    opt = fastaccum.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), K, model=model)
    assert train(model, opt, batches) == [False]


def test_a_hook_added_later_switches_to_torchs_step():
    batches = token_batches(2 * K)
    model, opt = build("AdamW")
    train(model, opt, batches[:K])
    assert opt.stats()["fused_update"] is True
    seen = []
    opt.optimizer.register_step_post_hook(lambda o, args, kwargs: seen.append(1))
    train(model, opt, batches[K:])
    assert opt.stats()["fused_update"] is False
    assert seen == [1]


def test_a_global_step_hook_gets_torchs_step():
    """torch's global optimizer hooks may read .grad (which the fused update never writes)
    or return new arguments: while one is registered, torch's step runs, once per window,
    and the hook sees the wrapped optimizer with the window gradient in .grad."""
    batches = token_batches(3 * K)
    model, opt = build("SGD")
    seen = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
        seen.append((optimizer, all(g is not None for g in grads)))
        return args, kwargs

    handle = register_optimizer_step_pre_hook(hook)
    try:
        assert train(model, opt, batches) == [False] * 3
    finally:
        handle.remove()
    assert seen == [(opt.optimizer, True)] * 3
    assert train(model, opt, batches) == [True] * 3  # the hook is gone


def test_a_scheduler_on_the_inner_optimizer_sees_its_steps():
    """A scheduler built on the wrapped optimizer: no "lr_scheduler.step() before
    optimizer.step()" warning, and the learning rates follow the windows."""
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)
    opt = fastaccum.wrap(inner, K, model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in token_batches(2 * K):
            if micro_step(model, opt, x, y):
                assert opt.stats()["fused_update"] is True
                sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(2.5e-3)


def test_fused_update_must_be_none_or_a_bool():
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="fused_update must be None, True or False, got str"):
        fastaccum.wrap(inner, K, fused_update="yes")


def rmsprop_adamw(params) -> list[torch.optim.Optimizer]:
    """RMSprop (torch's step) for the 2-D weights, AdamW (fusable) for the rest."""
    matrices, rest = by_shape(params)
    return [torch.optim.RMSprop(matrices, lr=1e-3), torch.optim.AdamW(rest, lr=1e-2)]


@pytest.mark.parametrize(
    ("members", "all_fused"),
    [
        (sgd_adamw, True),
        (members_of("fused-adamw"), True),  # torch SGD beside a fused class
        (rmsprop_adamw, False),
    ],
    ids=["sgd+adamw", "sgd+fused-class", "rmsprop+adamw"],
)
@pytest.mark.parametrize("mode", ["step", "backward"])
def test_list_members_take_the_fused_update(members, all_fused, mode):
    """In wrap([...], K) every torch.optim SGD/Adam/AdamW member takes the fused update;
    the others keep their step(). Equal to the large batch (rel 1e-5) and to torch's
    steps on the same windows (rel 1e-6)."""
    batches = token_batches(3 * K + 1)
    runs = []
    for fused_update in (True, False):
        model = make_model()
        opt = fastaccum.wrap(
            members(model.parameters()),
            K,
            model=model,
            max_grad_norm=1.0,
            fused_update=fused_update,
        )
        taken = train(model, opt, batches, mode)
        runs.append(model)
        if fused_update:
            assert taken == [all_fused] * 4
    ref_model, _ = large_batch_run(
        lambda params: [
            m.optimizer if isinstance(m, fastaccum.AccumulatingOptimizer) else m
            for m in members(params)
        ],
        split_windows(batches, K),
        max_grad_norm=1.0,
    )
    for p, q, r in zip(
        runs[0].parameters(), runs[1].parameters(), ref_model.parameters(), strict=True
    ):
        assert_close_rel(p, r, 1e-5)
        assert_close_rel(p, q, 1e-6)


def test_a_list_member_with_a_hook_keeps_its_step():
    model = make_model()
    sgd, adamw = sgd_adamw(model.parameters())
    seen = []
    sgd.register_step_post_hook(lambda o, args, kwargs: seen.append(1))
    opt = fastaccum.wrap([sgd, adamw], K, model=model)
    assert train(model, opt, token_batches(K)) == [False]  # SGD: torch's step
    assert seen == [1]
    assert adamw.state  # the fused AdamW member stepped its own state


def test_a_fused_list_member_is_bit_identical_to_the_fused_class_member():
    """[RMSprop, torch AdamW] with the fused update trains exactly as [RMSprop,
    fastaccum.optim.AdamW]: the AdamW member ran the fused class's kernel."""
    batches = token_batches(2 * K)
    runs = []
    for fused_class in (False, True):
        model = make_model()
        rmsprop, adamw = rmsprop_adamw(model.parameters())
        if fused_class:
            adamw = fastaccum.optim.AdamW(adamw.param_groups[0]["params"], lr=1e-2)
        opt = fastaccum.wrap([rmsprop, adamw], K, model=model, max_grad_norm=1.0)
        assert train(model, opt, batches) == [False, False]  # RMSprop: torch's step
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(p, q)


def sgd_windows(model, opt, batches, change=None) -> list[bool]:
    """Train; after the first window, apply ``change(groups)`` to the param groups."""
    taken = []
    for x, y in batches:
        if micro_step(model, opt, x, y):
            taken.append(opt.stats()["fused_update"])
            if change is not None and len(taken) == 1:
                change(opt.param_groups)
    return taken


@pytest.mark.parametrize(
    ("change", "fused_after"),
    [
        (lambda groups: groups[0].update(momentum=0.0), True),  # torch: plain SGD
        (lambda groups: groups[0].update(dampening=0.1), False),  # no fused Nesterov+dampening
    ],
    ids=["momentum-0", "dampening"],
)
def test_nesterov_groups_changed_between_windows_follow_torch(change, fused_after):
    """A Nesterov group whose options change between windows (a momentum schedule, say):
    the fused update where its kernel takes them, torch's step where not; equal to
    torch's step throughout."""
    batches = token_batches(3 * K)
    runs = []
    for fused_update in (True, False):
        model = make_model()
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        opt = fastaccum.wrap(inner, K, model=model, fused_update=fused_update)
        taken = sgd_windows(model, opt, batches, change)
        if fused_update:
            assert taken == [True, fused_after, fused_after]
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert_close_rel(p, q, 1e-6)


def test_a_fused_class_refuses_unsupported_options_before_updating_any_group():
    model = make_model()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = fastaccum.optim.SGD(
        [{"params": first}, {"params": second, "nesterov": True}],
        lr=0.1,
        momentum=0.9,
        accum_steps=K,
    )
    opt.param_groups[1]["dampening"] = 0.5
    before = [p.clone() for p in model.parameters()]
    batches = token_batches(K)
    for x, y in batches[:-1]:
        micro_step(model, opt, x, y)
    with pytest.raises(ValueError, match=r"param group 1 has nesterov=True with .* dampening"):
        micro_step(model, opt, *batches[-1])
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert not opt.optimizer.state  # no momentum buffer made either


@pytest.mark.parametrize("fused_update", [True, False])
def test_a_group_added_to_the_wrapped_optimizer_is_accumulated(fused_update):
    """``inner.add_param_group`` after wrapping (an unfreeze callback holding the
    optimizer) trains as the same group added through the wrapper."""
    batches = token_batches(3 * K)
    runs = []
    for through_wrapper in (False, True):
        model = make_model()
        params = list(model.parameters())
        inner = torch.optim.AdamW(params[:3], lr=1e-2)
        opt = fastaccum.wrap(inner, K, model=model, fused_update=fused_update)
        for i, (x, y) in enumerate(batches):
            if i == K:
                group = {"params": params[3:], "lr": 3e-3}
                (opt if through_wrapper else inner).add_param_group(group)
            micro_step(model, opt, x, y)
        assert opt.stats()["fused_update"] is fused_update
        runs.append(model)
    start = list(make_model().parameters())
    for p, q, p0 in zip(runs[0].parameters(), runs[1].parameters(), start, strict=True):
        assert torch.equal(p, q)
        assert not torch.equal(p, p0)  # the added group trained too
        assert p.grad is None


def test_a_group_the_wrapper_cannot_take_is_refused_at_each_step():
    model = make_model()
    params = list(model.parameters())
    inner = torch.optim.SGD(params[:3], lr=0.1)
    opt = fastaccum.wrap(inner, K, model=model)
    inner.add_param_group({"params": [torch.zeros(3, dtype=torch.complex32, requires_grad=True)]})
    x, y = token_batches(1)[0]
    mean_loss(model, x, y).backward()
    for _ in range(2):
        with pytest.raises(TypeError, match="param group 1, added to the wrapped optimizer"):
            opt.step()
    assert opt.micro_step == 0


def test_a_group_added_to_a_list_member_is_accumulated():
    """The list's wrapper takes in a group added to one of its members."""
    batches = token_batches(3 * K)
    model = make_model()
    params = list(model.parameters())
    start = [p.clone() for p in params]
    sgd = torch.optim.SGD(params[:2], lr=0.1)
    adamw = torch.optim.AdamW(params[2:4], lr=1e-2)
    opt = fastaccum.wrap([sgd, adamw], K, model=model)
    for i, (x, y) in enumerate(batches):
        if i == K:
            adamw.add_param_group({"params": params[4:]})
        micro_step(model, opt, x, y)
    assert opt.stats()["fused_update"] is True
    for p, p0 in zip(params, start, strict=True):
        assert not torch.equal(p, p0)
        assert p.grad is None
    assert len(adamw.state) == len(params) - 2


def test_a_fused_class_refuses_a_group_added_to_its_optimizer():
    """A fused class takes in a group added to its torch optimizer only if its kernel can
    update it: a view with gaps is refused at each step, naming the group."""
    model = make_model()
    params = list(model.parameters())
    opt = fastaccum.optim.AdamW(params, lr=1e-2, accum_steps=K)
    gappy = torch.nn.Parameter(torch.zeros(4, 6)[:, ::2])
    opt.optimizer.add_param_group({"params": [gappy]})
    x, y = token_batches(1)[0]
    mean_loss(model, x, y).backward()
    with pytest.raises(ValueError, match=r"param group 1, added to the wrapped optimizer.*dense"):
        opt.step()
    assert opt.micro_step == 0
