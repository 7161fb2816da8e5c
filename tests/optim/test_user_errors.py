"""Mistakes users make with a wrapper, and what they get: a clear error that changes
nothing, or the lenient reading where one is safe."""

import copy
import io
import pickle

import numpy as np
import pytest
import torch

import fastaccum
from tests.helpers import make_model, mean_loss, micro_step, token_batches

K = 2


def wrapped(**kwargs):
    model = make_model()
    return model, fastaccum.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), K, **kwargs)


@pytest.mark.parametrize(
    "copier",
    [copy.deepcopy, copy.copy, pickle.dumps, lambda opt: torch.save(opt, io.BytesIO())],
    ids=["deepcopy", "copy", "pickle", "torch.save"],
)
@pytest.mark.parametrize("fused", [False, True])
def test_a_wrapper_refuses_to_be_copied_and_keeps_working(copier, fused):
    """A copy would lose the wrapped optimizer, the accumulators and K (torch.optim's
    pickling keeps only groups and state): refused, with the way to checkpoint."""
    model = make_model()
    if fused:
        opt = fastaccum.optim.AdamW(model.parameters(), lr=1e-2, accum_steps=K)
    else:
        opt = fastaccum.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), K)
    batches = token_batches(2 * K)
    micro_step(model, opt, *batches[0])
    with pytest.raises(TypeError, match=r"cannot be copied or pickled.*opt\.state_dict\(\)"):
        copier(opt)
    assert opt.micro_step == 1
    for x, y in batches[1:]:
        micro_step(model, opt, x, y)
    assert opt.stats()["windows"] == 2


def test_num_items_takes_numpy_scalars():
    """Counts from NumPy pipelines weigh exactly as the same Python numbers."""
    batches = token_batches(2 * K)
    models = []
    for convert in (int, np.int64, np.float32, np.array):
        model, opt = wrapped()
        for x, y in batches:
            mean_loss(model, x, y).backward()
            opt.step(num_items=convert(len(y)))
            opt.zero_grad()
        models.append(model)
    for other in models[1:]:
        for p, q in zip(models[0].parameters(), other.parameters(), strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (np.bool_(True), TypeError, "got bool"),
        (np.array([3, 4]), TypeError, "got ndarray"),
        (np.int64(0), ValueError, "num_items must be > 0, got 0"),
        ("3", TypeError, r"positive number \(int, float, or a one-element tensor or NumPy"),
    ],
)
def test_bad_num_items_changes_nothing(value, error, message):
    model, opt = wrapped()
    x, y = token_batches(1)[0]
    mean_loss(model, x, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(error, match=message):
        opt.step(num_items=value)
    assert opt.micro_step == 0
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)


def test_numpy_accum_steps_trains_as_the_python_int():
    batches = token_batches(2 * K)
    models = []
    for steps in (K, np.int64(K)):
        model = make_model()
        opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), steps)
        for x, y in batches:
            micro_step(model, opt, x, y)
        opt.accum_steps = np.int32(K)  # the setter takes it too
        assert opt.accum_steps == K and type(opt.accum_steps) is int
        models.append(model)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)


def test_flags_and_loss_of_the_wrong_type_are_named():
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="master_weights must be True or False, got str"):
        fastaccum.wrap(sgd, K, master_weights="yes")
    with pytest.raises(TypeError, match="embeddings must be True or False, got str"):
        fastaccum.fuse_wgrad(model, embeddings="no")
    assert all(type(m) is not fastaccum.nn.Embedding for m in model.modules())
    opt = fastaccum.wrap(sgd, K)
    with pytest.raises(TypeError, match=r"takes the loss tensor .* got float"):
        opt.backward(1.0)
    assert opt.micro_step == 0


def test_max_grad_norm_of_the_wrong_type_is_named():
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"max_grad_norm must be .* got str '1'"):
        fastaccum.wrap(sgd, K, max_grad_norm="1")
    with pytest.raises(TypeError, match="got bool True"):
        fastaccum.wrap(sgd, K, max_grad_norm=True)


@pytest.mark.parametrize("cls", [torch.nn.Embedding, torch.nn.EmbeddingBag])
def test_a_sparse_embedding_is_refused_when_wrapped(cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(cls(10, 4, sparse=True), torch.nn.Linear(4, 2))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"0 is an .* with sparse=True.*sparse=False"):
        fastaccum.wrap(sgd, K, model=model)
    # without model=, the first fold names it; nothing is folded
    opt = fastaccum.wrap(sgd, K)
    tokens = torch.tensor([[1, 2, 3]])
    model(tokens).sum().backward()
    with pytest.raises(TypeError, match=r"sparse_coo gradient.*sparse=False"):
        opt.step()
    assert opt.micro_step == 0


def test_a_refused_scaler_step_does_not_block_the_corrected_loop():
    """scaler.step(opt) on a wrapper built with scaler= is refused; the corrected loop
    (opt.step() alone) then trains, as the message says, with no scaler.update()."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    scaler = torch.amp.GradScaler("cpu")
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), K, scaler=scaler)
    x = torch.randn(3, 4)
    scaler.scale(model(x).pow(2).mean()).backward()
    with pytest.raises(RuntimeError, match=r"scaler\.step\(opt\) or scaler\.unscale_\(opt\)"):
        scaler.step(opt)
    opt.zero_grad()
    before = [p.clone() for p in model.parameters()]
    stepped = []
    for _ in range(K):
        scaler.scale(model(x).pow(2).mean()).backward()
        stepped.append(opt.step())
        opt.zero_grad()
    assert stepped == [False, True]
    assert opt.stats()["skipped_windows"] == 0
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("mode", ["step", "backward"])
def test_parameters_replaced_after_wrapping_are_named(mode):
    """``model.load_state_dict(..., assign=True)`` gives the model new Parameter objects,
    which the optimizer does not update: the missing-gradient error says so."""
    model = make_model()
    opt = fastaccum.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), K, model=model)
    model.load_state_dict(make_model(seed=1).state_dict(), assign=True)
    x, y = token_batches(1)[0]
    with pytest.raises(RuntimeError, match=r"no longer holds 7 of the parameters .*assign=True"):
        micro_step(model, opt, x, y, mode)
