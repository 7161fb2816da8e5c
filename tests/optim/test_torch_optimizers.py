"""``fastaccum.wrap`` around every optimizer class in ``torch.optim``.

The classes are discovered from the installed torch, so one added by a later release is
tested too. Each trains the token model for three windows and a partial one, clipped,
through both ``opt.step`` and ``opt.backward``, against the same class trained natively
on the concatenated batch of each window. Classes that cannot step on an accumulated
window are refused when wrapped.
"""

import pytest
import torch

import fastaccum
from tests.helpers import (
    assert_close_rel,
    by_shape,
    large_batch_run,
    make_model,
    micro_step,
    split_windows,
    token_batches,
)

K = 4
REFUSED = {"LBFGS": "needs a closure", "SparseAdam": "sparse gradients"}
# Muon updates 2-D weights only: it takes those, and an AdamW beside it the rest. Its
# bf16 orthogonalization turns float32 rounding into ~1e-3 weight differences (its exact
# check is in test_chained.py), so it gets a bf16-sized tolerance.
TOLERANCE = {"Muon": 2e-2}


def torch_optimizer_classes() -> list[str]:
    return sorted(
        name
        for name, cls in vars(torch.optim).items()
        if isinstance(cls, type)
        and issubclass(cls, torch.optim.Optimizer)
        and cls is not torch.optim.Optimizer
    )


def build(name: str):
    """params -> the optimizer (or list) of class ``name`` the run trains with."""
    cls = getattr(torch.optim, name)
    kwargs = {} if name == "Adadelta" else {"lr": 1e-2}  # Adadelta's lr is a scale, 1.0
    if name == "Muon":

        def muon_and_adamw(params):
            matrices, rest = by_shape(params)
            return [cls(matrices, **kwargs), torch.optim.AdamW(rest, lr=1e-2)]

        return muon_and_adamw
    return lambda params: cls(params, **kwargs)


def test_the_discovery_finds_the_usual_classes():
    assert {"SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "LBFGS"} <= set(torch_optimizer_classes())


@pytest.mark.parametrize("mode", ["step", "backward"])
@pytest.mark.parametrize("name", [n for n in torch_optimizer_classes() if n not in REFUSED])
def test_wrapped_matches_the_large_batch(name, mode):
    batches = token_batches(3 * K + 2, seed=11)
    make = build(name)
    want, _ = large_batch_run(make, split_windows(batches, K), max_grad_norm=0.5)
    model = make_model()
    opt = fastaccum.wrap(make(model.parameters()), K, model=model, max_grad_norm=0.5)
    stepped = [micro_step(model, opt, x, y, mode) for x, y in batches]
    assert stepped == [(i + 1) % K == 0 for i in range(len(batches))]
    assert opt.flush() is True
    assert opt.stats()["grad_norm"] > 0.5  # clipped in every window
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, TOLERANCE.get(name, 1e-5))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_classes_say_why(name):
    model = make_model()
    params = list(model.parameters())
    inner = getattr(torch.optim, name)(params if name != "SparseAdam" else params[:1])
    with pytest.raises(TypeError, match=REFUSED[name]):
        fastaccum.wrap(inner, K, model=model)
