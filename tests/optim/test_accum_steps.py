"""``opt.accum_steps = K``: a batch-size schedule. Each window trains exactly like one batch
of the micro-batches it held, whatever K was when it opened.

The reference is the plain torch optimizer on the concatenated batch of each window (one
backward over all of its items), with windows of the scheduled sizes.
"""

import pytest
import torch

import fastaccum
import fastaccum.optim as fo
from tests.helpers import (
    OPTIM_KINDS,
    assert_close_rel,
    large_batch_run,
    make_model,
    mean_loss,
    micro_step,
    resume,
    token_batches,
)

SCHEDULE = [2, 3, 5, 1, 4]  # K of each window, set at its boundary


def windows_of(batches: list, sizes: list[int]) -> list[list]:
    """Consecutive windows of the given sizes."""
    out, start = [], 0
    for k in sizes:
        out.append(batches[start : start + k])
        start += k
    assert start == len(batches)
    return out


def build(setup: str, kind: str, k: int, max_grad_norm=None):
    """(model, opt): ``wrap`` around torch's optimizer ``kind``, fastaccum's fused class of
    that name, or ``wrap`` over a ``fuse_wgrad`` model."""
    model = make_model()
    if setup == "fuse_wgrad":
        fastaccum.fuse_wgrad(model)
    if setup == "fused_class":
        opt = getattr(fo, kind)(
            model.parameters(),
            accum_steps=k,
            model=model,
            max_grad_norm=max_grad_norm,
            **OPTIM_KINDS[kind],
        )
    else:
        params = model.parameters()
        opt = fo.wrap(torch_opt(kind)(params), k, model=model, max_grad_norm=max_grad_norm)
    return model, opt


def torch_opt(kind: str):
    """params -> torch.optim's ``kind`` with the shared test hyperparameters."""
    return lambda params: getattr(torch.optim, kind)(params, **OPTIM_KINDS[kind])


@pytest.mark.parametrize("setup", ["wrap", "fused_class", "fuse_wgrad"])
@pytest.mark.parametrize("kind", ["SGD", "AdamW"])
@pytest.mark.parametrize("mode", ["step", "backward"])
def test_schedule_set_at_boundaries_matches_large_batches_of_those_sizes(setup, kind, mode):
    batches = token_batches(sum(SCHEDULE), seed=31)
    want, _ = large_batch_run(torch_opt(kind), windows_of(batches, SCHEDULE), 0.5)
    model, opt = build(setup, kind, SCHEDULE[0], max_grad_norm=0.5)
    schedule = iter(SCHEDULE[1:])
    stepped = []
    for x, y in batches:
        stepped.append(micro_step(model, opt, x, y, mode))
        if stepped[-1]:
            opt.accum_steps = next(schedule, opt.accum_steps)
            assert opt.stats()["accum_steps"] == opt.accum_steps
    ends = {sum(SCHEDULE[: i + 1]) - 1 for i in range(len(SCHEDULE))}
    assert stepped == [i in ends for i in range(len(batches))]
    assert opt.stats()["windows"] == len(SCHEDULE)
    if setup == "fuse_wgrad" and mode == "backward":
        assert opt._fused_seen  # the Linear weights were written by the fused GEMM
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


@pytest.mark.parametrize("mode", ["step", "backward"])
def test_mid_window_changes_close_the_window_at_the_new_size(mode):
    """K 4 -> 6 after two micro-batches (the window takes 6), then K 8 -> 3 after one (it
    closes at 3), then a last window of 3."""
    sizes = [6, 3, 3]
    batches = token_batches(sum(sizes), seed=32)
    want, _ = large_batch_run(torch_opt("AdamW"), windows_of(batches, sizes))
    model, opt = build("wrap", "AdamW", 4)
    stepped = []
    for i, (x, y) in enumerate(batches):
        if i == 2:
            opt.accum_steps = 6
        if i == 6:
            opt.accum_steps = 8
        if i == 7:
            assert opt.micro_step == 1
            opt.accum_steps = 3
        stepped.append(micro_step(model, opt, x, y, mode))
    assert stepped == [i in (5, 8, 11) for i in range(len(batches))]
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def snapshot(opt) -> tuple:
    return (
        opt.accum_steps,
        opt.micro_step,
        {id(p): acc.clone() for p, acc in opt._accums.items()},
    )


def assert_unchanged(opt, before: tuple) -> None:
    steps, micro, accums = before
    assert (opt.accum_steps, opt.micro_step) == (steps, micro)
    assert accums.keys() == {id(p) for p in opt._accums}
    for p, acc in opt._accums.items():
        assert torch.equal(acc, accums[id(p)])


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, "accum_steps must be >= 1, got 0"),
        (-2, ValueError, "accum_steps must be >= 1"),
        (2.0, TypeError, "accum_steps must be an int, got float"),
        (True, TypeError, "got bool"),
        ("4", TypeError, "got str"),
        (2, ValueError, "already holds 2 micro-batch.*at least 3.*opt.flush"),
        (1, ValueError, "already holds 2 micro-batch"),
    ],
)
def test_bad_values_are_refused_and_change_nothing(value, error, match):
    """Refused mid-window (two micro-batches held); the run then goes on exactly as if the
    assignment had never been tried."""
    batches = token_batches(8, seed=33)
    want, _ = large_batch_run(torch_opt("SGD"), windows_of(batches, [4, 4]))
    model, opt = build("wrap", "SGD", 4)
    for i, (x, y) in enumerate(batches):
        if i == 2:
            before = snapshot(opt)
            with pytest.raises(error, match=match):
                opt.accum_steps = value
            assert_unchanged(opt, before)
        micro_step(model, opt, x, y, "step")
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


@pytest.mark.parametrize("mode", ["step", "backward"])
def test_refused_while_a_micro_batch_is_in_flight(mode):
    batches = token_batches(4, seed=34)
    want, _ = large_batch_run(torch_opt("SGD"), windows_of(batches, [4]))
    model, opt = build("wrap", "SGD", 4)
    for i, (x, y) in enumerate(batches):
        loss = mean_loss(model, x, y)
        if mode == "backward":
            opt.backward(loss, num_items=len(y))
        else:
            loss.backward()
        if i == 1:
            before = snapshot(opt)
            call = "opt.backward" if mode == "backward" else "loss.backward"
            with pytest.raises(RuntimeError, match=rf"set between {call}\(\) and opt.step\(\)"):
                opt.accum_steps = 2  # would make this micro-batch the last of its window
            assert_unchanged(opt, before)
        opt.step(num_items=None if mode == "backward" else len(y))
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def test_setting_the_same_value_in_flight_is_a_no_op():
    """A schedule that assigns K on every micro-batch, mostly unchanged, never trips."""
    model, opt = build("wrap", "SGD", 3)
    x, y = token_batches(1, seed=35)[0]
    mean_loss(model, x, y).backward()
    opt.accum_steps = 3
    assert opt.step(num_items=len(y)) is False


def test_resume_after_a_change_restores_k_and_continues_bit_identically():
    """K changes 4 -> 6 mid-run; a checkpoint taken 2 micro-batches into a K=6 window loads
    into a wrapper built with K=4: K=6 is restored (with a warning that says so), and the
    run equals the uninterrupted one bit for bit."""
    batches = token_batches(14, seed=36)

    def run(stop_at):
        model, opt = build("wrap", "AdamW", 4, max_grad_norm=1.0)
        for i, (x, y) in enumerate(batches):
            if i == 4:
                opt.accum_steps = 6
            if i == stop_at:
                with pytest.warns(RuntimeWarning, match="accum_steps is now 6, restored"):
                    model, opt = resume(model, opt, lambda: build("wrap", "AdamW", 4, 1.0))
                assert (opt.accum_steps, opt.micro_step) == (6, 2)
            micro_step(model, opt, x, y, "step")
        return model, opt

    straight, s_opt = run(None)
    resumed, r_opt = run(6)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert s_opt.stats() == r_opt.stats()
    assert r_opt.micro_step == 4 and r_opt.stats()["windows"] == 2


@pytest.mark.parametrize(("steps", "micro"), [(3, 3), (0, 0), (4.0, 1), (4, -1), (4, None)])
def test_inconsistent_saved_window_is_refused_and_changes_nothing(steps, micro):
    model, opt = build("wrap", "SGD", 4)
    for x, y in token_batches(2, seed=37):
        micro_step(model, opt, x, y, "step")
    sd = opt.state_dict()
    sd["fastaccum"]["accum_steps"], sd["fastaccum"]["micro_step"] = steps, micro
    before = snapshot(opt)
    with pytest.raises(ValueError, match="state dict is inconsistent"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before)
