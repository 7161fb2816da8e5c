"""Batch planning with a memory budget on the CPU, and the peak-memory counter it uses."""

import random

import pytest
import torch

import fastaccum
from fastaccum.memory.peak import LiveTensorBytes, peak_bytes, tensor_bytes
from fastaccum.memory.planner import PlanningError, _size, _split, plan_batch

SEQ = 32


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(64, 32),
        torch.nn.Linear(32, 128),
        torch.nn.GELU(),
        torch.nn.Linear(128, 64),
    )


def _make_batch(n):
    return torch.randint(0, 64, (n, SEQ + 1))


def _loss(model, batch):
    logits = model(batch[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def _plan(model, opt, budget, target=64):
    return plan_batch(
        model, _make_batch, target, optimizer=opt, loss_fn=_loss, memory_budget=budget,
        verbose=False,
    )  # fmt: skip


def test_live_bytes_matches_hand_count():
    # Peak and current bytes of float32 tensors made and dropped in a known order.
    def work():
        a = torch.empty(1000)
        b = torch.empty(2000)
        view = b[:10]  # a view makes no storage
        c = torch.ones(500) * 2  # ones (freed right after) and the product
        del a
        return view, c

    with LiveTensorBytes() as live:
        view, c = work()
        assert live.current == 4 * (2000 + 500)
    assert live.peak == 4 * (1000 + 2000 + 500 + 500)
    del view, c
    assert live.current == 0


def test_live_bytes_counts_backward():
    # A Linear's forward and backward: the weight gradient (out x in) is made in backward.
    layer = torch.nn.Linear(256, 512)
    x = torch.randn(8, 256, requires_grad=True)
    peak, _ = peak_bytes(lambda: layer(x).sum().backward(), "cpu")
    assert peak >= 4 * (512 * 256 + 512 + 8 * 256)
    assert layer.weight.grad is not None


def test_budget_is_respected_and_larger_budget_gives_larger_micro_batch():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    small = _plan(model, opt, 3e6)
    large = _plan(model, opt, 8e6)
    assert small.micro_batch_size < large.micro_batch_size
    for plan in (small, large):
        assert plan.measured_peak_bytes <= plan.usable_bytes <= plan.budget_bytes
        assert plan.effective_batch_size == 64
        assert sum(plan.micro_batch_sizes()) == 64
        # Independent check: a fresh copy of the model trained for a window at the plan's
        # micro-batch with the wrapper, measured with the allocator-level counter.
        fresh = _model()
        wrapped = fastaccum.wrap(torch.optim.AdamW(fresh.parameters(), lr=1e-3), 2)

        def window(fresh=fresh, wrapped=wrapped, b=plan.micro_batch_size):
            for _ in range(2):
                _loss(fresh, _make_batch(b)).backward()
                wrapped.step()
                wrapped.zero_grad()

        resident = sum(p.numel() * 4 for p in fresh.parameters())
        peak, _ = peak_bytes(window, "cpu")
        assert resident + peak <= plan.budget_bytes


def test_split_reaches_the_target_and_explains_a_remainder():
    assert _split(64, 16) == (16, 4, 16)
    assert _split(64, 20) == (16, 4, 16)  # same number of steps, evenly split
    assert _split(10, 4) == (4, 3, 2)
    assert _split(7, 100) == (7, 1, 7)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = plan_batch(
        model, _make_batch, 7, optimizer=opt, loss_fn=_loss, memory_budget=1.9e6,
        headroom=0.0, verbose=False,
    )  # fmt: skip
    assert plan.effective_batch_size == 7
    if plan.last_micro_batch_size != plan.micro_batch_size:
        assert any("num_items" in r for r in plan.reasons)


def test_planning_changes_nothing():
    model = fastaccum.convert_batchnorm(
        torch.nn.Sequential(
            torch.nn.Embedding(64, 16), torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(SEQ)
        )
    )
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = fastaccum.wrap(inner, 4, model=model)

    def loss_fn(m, batch):
        return m(batch[:, :SEQ]).square().mean()

    # Mid-window state: optimizer state after one window, accumulators half full.
    for i in range(6):
        loss_fn(model, _make_batch(3)).backward()
        opt.step()
        opt.zero_grad()
        if i == 5:
            loss_fn(model, _make_batch(3)).backward()  # a pending .grad too
    model.eval()
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    before_grads = [p.grad.clone() for p in model.parameters()]
    before_accums = {k: v.clone() for k, v in opt.window_accums().items()}
    before_state = {
        p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
        for p, s in inner.state.items()
    }
    bn = model[2]
    before_window = (bn.window_count, bn.window_mean.clone(), bn.window_m2.clone())
    torch.manual_seed(123)
    random.seed(7)
    expected_draws = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(7)

    plan_batch(model, _make_batch, 8, optimizer=opt, loss_fn=loss_fn, verbose=False)

    assert (torch.rand(3), random.random())[1] == expected_draws[1]
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_model[k]), k
    for p, g in zip(model.parameters(), before_grads, strict=True):
        assert torch.equal(p.grad, g)
    assert opt.micro_step == 2
    for p, acc in opt.window_accums().items():
        assert torch.equal(acc, before_accums[p])
    for p, s in before_state.items():
        for k, v in s.items():
            assert torch.equal(inner.state[p][k], v)
    assert bn.window_count == before_window[0]
    assert torch.equal(bn.window_mean, before_window[1])
    assert torch.equal(bn.window_m2, before_window[2])
    # And training continues as if nothing happened: the window still closes on step 4.
    opt.step()
    opt.zero_grad()
    loss_fn(model.train(), _make_batch(3)).backward()
    assert opt.step() is True


def test_impossible_budget_says_what_is_missing():
    model = _model()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(PlanningError, match=r"micro-batch 1 does not fit.*KiB missing") as err:
        _plan(model, torch.optim.AdamW(model.parameters()), 2e5)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    # 2e5 bytes less 10% headroom: the usable memory is named in the unit that reads best
    assert f"against {_size(1.8e5)} usable ({_size(2e5)} budget" in str(err.value)
    assert _size(1.8e5) == "176 KiB"


@pytest.mark.parametrize(
    ("n_bytes", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1536, "1.50 KiB"),
        (10 * 2**10, "10.0 KiB"),
        (20.5 * 2**20, "20.5 MiB"),
        (80 * 2**30, "80.0 GiB"),
        (999.9 * 2**10, "0.976 MiB"),  # not "1e+03 KiB"
    ],
)
def test_sizes_read_in_the_unit_that_fits(n_bytes, text):
    assert _size(n_bytes) == text


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target_batch_size": 0}, ValueError, "target_batch_size must be >= 1"),
        ({"target_batch_size": 2.0}, TypeError, "must be an int"),
        ({"headroom": 1.0}, ValueError, "headroom"),
        ({"memory_budget": 0}, ValueError, "memory_budget"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"target_batch_size": 8, **kwargs}
    with pytest.raises(error, match=match):
        plan_batch(_model(), _make_batch, verbose=False, **args)


def test_no_parameters_is_an_error():
    with pytest.raises(ValueError, match="no parameters"):
        plan_batch(torch.nn.ReLU(), _make_batch, 8, verbose=False)


def test_search_finds_the_exact_largest_micro_batch():
    # Reference: every micro-batch from 1 up, each a real window through the wrapper,
    # with the memory already allocated (parameters, optimizer state) counted.
    budget, headroom = 1.6e6, 0.1
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plan = _plan(model, opt, budget, target=200)
    usable = int(budget * (1 - headroom))
    fresh = _model()
    inner = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    largest = 0
    for b in range(1, 200):
        wrapped = fastaccum.wrap(inner, 2)

        def window(wrapped=wrapped, b=b):
            for _ in range(2):
                _loss(fresh, _make_batch(b)).backward()
                wrapped.step()
                wrapped.zero_grad()

        state = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
        resident = tensor_bytes([*fresh.parameters(), *state])
        peak, _ = peak_bytes(window, "cpu")
        if resident + peak > usable:
            break
        largest = b
    assert 1 < largest < 200
    assert plan.max_micro_batch_size == largest
