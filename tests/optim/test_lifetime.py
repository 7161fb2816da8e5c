"""A wrapper's lifetime. Dropping it frees it at once, with its accumulators and optimizer
state, takes its hooks off the parameters and leaves the model to plain torch or to the next
wrapper. Copies and pickles of a model it is attached to leave it out."""

import copy
import io
import weakref

import pytest
import torch

import fastaccum
import fastaccum.optim
from fastaccum.nn import fuse_wgrad
from tests.helpers import (
    assert_close_rel,
    collector_off,
    make_model,
    mean_loss,
    split_windows,
    token_batches,
)

K = 3


def make_wrapper(kind: str, model: torch.nn.Module):
    if kind == "wrap":
        return fastaccum.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), K, model=model)
    return fastaccum.optim.AdamW(model.parameters(), lr=1e-2, accum_steps=K, model=model)


def train(opt, model, batches):
    for x, y in batches:
        opt.backward(mean_loss(model, x, y), num_items=len(x))
        opt.step()


@pytest.mark.parametrize("kind", ["wrap", "fused"])
@pytest.mark.parametrize("fused_layers", [False, True], ids=["nn", "fuse_wgrad"])
def test_a_dropped_wrapper_is_freed_and_the_next_one_trains_exactly(kind, fused_layers):
    data = token_batches(4 * K, seed=2)
    model = make_model()
    if fused_layers:
        fuse_wgrad(model)
    opt = make_wrapper(kind, model)
    # one window, then one micro-batch of the next: accumulators and state are populated
    train(opt, model, data[: K + 1])
    refs = [weakref.ref(opt), weakref.ref(opt.optimizer)]
    with collector_off():
        del opt
        assert [ref() is not None for ref in refs] == [False, False]
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    assert all(getattr(m, "_wgrad_sink", None) is None for m in model.modules())

    # The reference starts from the same weights: plain torch, one backward per window.
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    rest = data[K + 1 :]  # 3K - 1 micro-batches: the last window is short
    for window in split_windows(rest, K):
        x = torch.cat([b[0] for b in window])
        y = torch.cat([b[1] for b in window])
        mean_loss(ref, x, y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    opt = make_wrapper(kind, model)
    train(opt, model, rest)
    assert opt.flush()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def test_copies_and_pickles_of_an_attached_model_leave_the_wrapper_out():
    model = fuse_wgrad(make_model())
    opt = fastaccum.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), 2, model=model)
    x, y = token_batches(1, seed=3)[0]
    train(opt, model, [(x, y)])  # mid-window: the parameters have not moved yet
    buf = io.BytesIO()
    torch.save(model, buf)
    assert b"AccumulatingOptimizer" not in buf.getvalue()
    buf.seek(0)
    copies = [copy.deepcopy(model), torch.load(buf, weights_only=False)]

    plain = make_model()  # same seed, same weights, nn layers
    mean_loss(plain, x, y).backward()
    for other in copies:
        assert all(getattr(m, "_wgrad_sink", None) is None for m in other.modules())
        mean_loss(other, x, y).backward()  # plain torch: every gradient lands in .grad
        for p, q in zip(other.parameters(), plain.parameters(), strict=True):
            assert_close_rel(p.grad, q.grad, 1e-6)
    # the original is still attached: its fused weights keep skipping .grad
    assert model[0]._wgrad_sink is opt and model[1]._wgrad_sink is opt
    opt.backward(mean_loss(model, x, y), num_items=len(x))
    assert model[0].weight.grad is None and model[1].weight.grad is None


def test_a_dropped_wrapper_takes_its_activation_policy_off_the_model():
    model = make_model()
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    policy = fastaccum.ActivationPolicy(bits=8)
    opt = fastaccum.wrap(
        torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model, activations=policy
    )
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) != hooks
    x, y = token_batches(1, seed=4)[0]
    opt.backward(mean_loss(model, x, y), num_items=len(x))
    del opt
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
    # the model's forward saves its tensors as plain torch does again: exact gradients
    plain = make_model()
    mean_loss(model, x, y).backward()
    mean_loss(plain, x, y).backward()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
