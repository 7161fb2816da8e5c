"""Gradient hooks of the user's on fused layers' parameters: a layer whose weight or bias
has one runs as its torch counterpart, so that the hook sees (and may change) the
gradient, exactly as with the unfused model; without hooks the layers still route."""

import copy

import torch

import fastaccum

K = 3


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 5))


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 10, (4, 6), generator=gen) for _ in range(2 * K)]


def _train(model: torch.nn.Module, hooks) -> list[bool]:
    """Two windows through wrap + opt.backward with ``hooks(model)`` registered first;
    for each parameter, whether a fused layer wrote its gradient (routed)."""
    hooks(model)
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.5), K, model=model)
    for x in _batches():
        opt.backward(model(x).square().mean())
        opt.step()
    return [id(p) in opt._fused_seen for p in model.parameters()]


def _mask_rows(model: torch.nn.Module) -> None:
    mask = torch.zeros(10, 1)
    mask[8:] = 1.0  # only the new rows 8 and 9 train
    model[0].weight.register_hook(lambda g: g * mask)
    model[1].bias.register_hook(lambda g: g * 0.0)  # a frozen bias


def test_hooks_see_and_change_the_gradient_as_with_unfused_layers():
    plain, fused = _model(), fastaccum.fuse_wgrad(_model())
    start = copy.deepcopy(plain.state_dict())
    _train(plain, _mask_rows)
    assert _train(fused, _mask_rows) == [False, False, False]
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)
    changed = (fused[0].weight != start["0.weight"]).any(1).nonzero().flatten().tolist()
    assert changed == [8, 9]
    assert torch.equal(fused[1].bias, start["1.bias"])
    assert not torch.equal(fused[1].weight, start["1.weight"])


def test_a_post_accumulate_grad_hook_of_the_user_sees_the_gradient():
    seen: list[torch.Tensor | None] = []

    def hooks(model):
        model[1].weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad))

    assert _train(fastaccum.fuse_wgrad(_model()), hooks) == [True, False, False]
    assert len(seen) == 2 * K
    assert all(g is not None and g.shape == (5, 8) for g in seen)


def test_without_hooks_the_layers_route_and_no_weight_gradient_is_made():
    routed = _train(fastaccum.fuse_wgrad(_model()), lambda model: None)
    assert routed == [True, True, True]  # into the wrapper's accumulators


def test_a_removed_hook_lets_the_layer_route_again():
    model = fastaccum.fuse_wgrad(_model())
    handle = model[0].weight.register_hook(lambda g: g)
    handle.remove()
    assert _train(model, lambda m: None) == [True, True, True]
