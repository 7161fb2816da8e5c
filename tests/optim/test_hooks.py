"""Step hooks and learning-rate changes: what torch.optim users attach to an optimizer
sees one step per window.

- Step hooks registered on the wrapper (and torch's global ones) run around each window's
  update, never on the micro-steps that only fold a gradient, and not for a skipped
  window. A post hook sees the post-step state: with bf16 parameters and fp32 masters the
  updated values are already copied back.
- A learning rate that changes inside a window (an LR scheduler stepped on every
  micro-batch) is used only at the boundary: the wrapper warns once, at the user's line.
"""

import warnings

import pytest
import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import fastaccum.optim as fo
from tests.helpers import make_model, mean_loss, token_batches

K = 3


def make(kind: str):
    if kind == "wrap-bf16-masters":
        model = make_model(dtype=torch.bfloat16)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, fo.wrap(inner, K, master_weights=True)
    model = make_model()
    if kind == "fused":
        return model, fo.AdamW(model.parameters(), lr=1e-2, accum_steps=K)
    return model, fo.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), K)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["wrap", "wrap-bf16-masters", "fused"])
def test_step_hooks_run_once_per_update_around_it(kind):
    model, opt = make(kind)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o, snapshot(model))))
    opt.register_step_post_hook(
        lambda o, args, kwargs: calls.append(("post", o, snapshot(model), o.micro_step))
    )
    shared = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, kw: shared.append("pre")),
        register_optimizer_step_post_hook(lambda o, a, kw: shared.append("post")),
    ]
    try:
        before, after = [], []  # parameters around each stepping step() call
        batches = token_batches(4 * K, seed=3)
        for i, (x, y) in enumerate(batches):
            if i == K:  # the second window gets a non-finite gradient and is skipped
                (mean_loss(model, x, y) * float("inf")).backward()
            else:
                mean_loss(model, x, y).backward()
            state = snapshot(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the skip's warning
                if opt.step():
                    before.append(state)
                    after.append(snapshot(model))
            opt.zero_grad()
    finally:
        for handle in handles:
            handle.remove()
    assert len(after) == 3  # windows 1, 3, 4 stepped
    assert [c[0] for c in calls] == ["pre", "post"] * 3
    assert shared == ["pre", "post"] * 3
    for (pre, post), want_before, want_after in zip(
        zip(calls[::2], calls[1::2], strict=True), before, after, strict=True
    ):
        assert pre[1] is opt and post[1] is opt
        assert all(torch.equal(a, b) for a, b in zip(pre[2], want_before, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(post[2], want_after, strict=True))
        assert not all(torch.equal(a, b) for a, b in zip(post[2], pre[2], strict=True))
        assert post[3] == 0  # the window is closed when post hooks run


def test_hook_handles_remove_and_a_pre_hook_must_return_none():
    model, opt = make("wrap")
    seen = []
    handle = opt.register_step_post_hook(lambda o, a, kw: seen.append(1))
    batches = token_batches(3 * K, seed=4)
    for x, y in batches[:K]:
        mean_loss(model, x, y).backward()
        opt.step()
    handle.remove()
    for x, y in batches[K : 2 * K]:
        mean_loss(model, x, y).backward()
        opt.step()
    assert seen == [1]

    opt.register_step_pre_hook(lambda o, a, kw: ((), {}))
    state = snapshot(model)
    for x, y in batches[2 * K : 3 * K - 1]:
        mean_loss(model, x, y).backward()
        opt.step()
    x, y = batches[-1]
    mean_loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match="must return None") as info:
        opt.step()
    assert "accumulated gradients were discarded" in "\n".join(info.value.__notes__)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), state, strict=True))
    assert opt.micro_step == 0
    assert all(p.grad is None for p in model.parameters())


def test_learning_rate_changed_inside_a_window_warns_once_at_the_users_line():
    """A scheduler stepped on every micro-batch moves the rate K times per window: warned
    once, pointing at this file (not at torch's scheduler wrapper around opt.step)."""
    model, opt = make("wrap")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in token_batches(2 * K, seed=5):
            mean_loss(model, x, y).backward()
            opt.step()
            sched.step()
    lr_warnings = [w for w in caught if "learning rate changed" in str(w.message)]
    assert len(lr_warnings) == 1
    assert "micro-batch 2 of 3" in str(lr_warnings[0].message)
    assert lr_warnings[0].filename == __file__


@pytest.mark.parametrize("accum_steps", [1, K])
def test_learning_rate_stepped_with_the_optimizer_does_not_warn(accum_steps):
    """Scheduler stepped when opt.step() returns True, or every call when K = 1."""
    model = make_model()
    opt = fo.wrap(torch.optim.SGD(model.parameters(), lr=0.1), accum_steps)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in token_batches(3 * K, seed=6):
            mean_loss(model, x, y).backward()
            if opt.step():
                sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (3 * K // accum_steps))
