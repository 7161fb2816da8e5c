"""``master_weights=True``: parameters changed in place after wrapping (a checkpoint loaded
into the model, an edit under ``torch.no_grad()``) are what the next update starts from,
as with a ``torch.optim`` step; the masters keep their fp32 precision otherwise."""

import copy

import pytest
import torch

import fastaccum
from tests.helpers import make_model, micro_step, token_batches

K = 2


def build(model, kind: str, lr: float = 0.1):
    if kind == "fused":
        return fastaccum.optim.SGD(
            model.parameters(), lr=lr, accum_steps=K, model=model, master_weights=True
        )
    inner = torch.optim.SGD(model.parameters(), lr=lr)
    return fastaccum.wrap(inner, K, model=model, master_weights=True)


def train(model, opt, batches, mode="step") -> None:
    for x, y in batches:
        micro_step(model, opt, x, y, mode)


def load(model, source, how: str) -> None:
    if how == "load_state_dict":
        model.load_state_dict(source.state_dict())
    else:
        with torch.no_grad():
            for p, q in zip(model.parameters(), source.parameters(), strict=True):
                p.copy_(q)


@pytest.mark.parametrize("how", ["load_state_dict", "copy_"])
@pytest.mark.parametrize("kind", ["wrap", "fused"])
def test_parameters_changed_after_wrapping_are_trained_from(kind, how):
    """Loaded after a window (the masters then hold more than the bf16 parameters), the
    new weights train exactly as a wrapper built on them (SGD: no state to carry)."""
    batches = token_batches(4 * K)
    model = make_model(dtype=torch.bfloat16)
    opt = build(model, kind)
    train(model, opt, batches[:K])
    other = make_model(seed=7, dtype=torch.bfloat16)
    load(model, other, how)
    train(model, opt, batches[K:])
    fresh = build(other, kind)
    train(other, fresh, batches[K:])
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt._masters[p], fresh._masters[q])


def test_a_change_mid_window_is_followed_and_saved():
    """Changed inside a window: the boundary update starts from the new weights, and a
    state dict taken before it saves them as the masters."""
    batches = token_batches(K)
    model = make_model(dtype=torch.bfloat16)
    opt = build(model, "wrap", lr=0.0)
    micro_step(model, opt, *batches[0])
    other = make_model(seed=7, dtype=torch.bfloat16)
    load(model, other, "load_state_dict")
    saved = opt.state_dict()["fastaccum"]["masters"]
    for master, q in zip(saved, other.parameters(), strict=True):
        assert torch.equal(master, q.float())
    assert micro_step(model, opt, *batches[1])
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)  # lr 0: the loaded weights, not the old masters


def test_edits_through_data_need_sync_masters():
    """``p.data`` edits bypass the version counter: the next update starts from the
    masters unless ``sync_masters()`` is called."""
    batches = token_batches(2 * K)
    model = make_model(dtype=torch.bfloat16)
    opt = build(model, "wrap", lr=0.0)
    before = [p.clone() for p in model.parameters()]
    for p in model.parameters():
        p.data.mul_(0.5)
    train(model, opt, batches[:K])
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)  # the masters' values came back
    for p in model.parameters():
        p.data.mul_(0.5)
    opt.sync_masters()
    train(model, opt, batches[K:])
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b * 0.5)


@pytest.mark.parametrize("mode", ["step", "backward"])
def test_masters_keep_their_precision_when_nothing_changes(mode):
    """No false alarm: the wrapper's own writes into the parameters (after each window),
    forward and backward (fused weight gradients included) leave the masters alone, so
    they hold more than the bf16 parameters and equal an fp32 run of the same updates."""
    batches = token_batches(4 * K)
    model = fastaccum.fuse_wgrad(make_model(dtype=torch.bfloat16))
    opt = build(model, "wrap", lr=1e-3)
    train(model, opt, batches, mode)
    masters = [opt._masters[p] for p in model.parameters()]
    assert any(
        not torch.equal(m, p.float()) for m, p in zip(masters, model.parameters(), strict=True)
    )
    for m, p in zip(masters, model.parameters(), strict=True):
        assert torch.equal(m.to(torch.bfloat16), p)


def test_sync_masters_without_masters_does_nothing():
    model = make_model()
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), K)
    opt.sync_masters()
    assert opt._masters == {}


@pytest.mark.parametrize("model_first", [True, False])
def test_a_resume_keeps_the_fp32_masters_in_either_order(model_first):
    """Checkpoint after some windows; resume loading the model before or after the
    wrapper's state dict: the masters are the saved fp32 ones either way (the model's
    bf16 weights are their rounding), and training continues bit-identically."""
    batches = token_batches(4 * K)
    model = make_model(dtype=torch.bfloat16)
    opt = build(model, "wrap", lr=1e-3)
    train(model, opt, batches[: 2 * K])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), opt.state_dict()
    saved_opt = copy.deepcopy(saved_opt)
    train(model, opt, batches[2 * K :])

    resumed = make_model(seed=3, dtype=torch.bfloat16)
    again = build(resumed, "wrap", lr=1e-3)
    if model_first:
        resumed.load_state_dict(saved_model)
        again.load_state_dict(saved_opt)
    else:
        again.load_state_dict(saved_opt)
        resumed.load_state_dict(saved_model)
    train(resumed, again, batches[2 * K :])
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt._masters[p], again._masters[q])
