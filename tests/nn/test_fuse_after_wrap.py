"""fuse_wgrad run on a model after its wrapper was built, and fused layers whose parameters
join the wrapper later (add_param_group): the wrapper takes the new layers (at once
between windows, from the next window inside one), and training equals the unfused run."""

import copy

import torch

import fastaccum

K = 3


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Linear(16, 1)
    )


def _inputs(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(4, 6, generator=gen) for _ in range(n)]


def _micro_batch(model, opt, x) -> None:
    opt.backward(model(x).square().mean())
    opt.step()


def _reference(windows: int) -> torch.nn.Module:
    model = _model()
    opt = fastaccum.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), K, model=model)
    for x in _inputs(windows * K):
        _micro_batch(model, opt, x)
    return model


def _assert_close(model, reference) -> None:
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_fuse_wgrad_after_wrapping_attaches_the_layers_between_windows():
    model = _model()
    opt = fastaccum.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), K, model=model)
    fastaccum.fuse_wgrad(model)
    assert all(m._wgrad_sink is opt for m in model if isinstance(m, fastaccum.nn.Linear))
    for x in _inputs(2 * K):
        _micro_batch(model, opt, x)
    assert {id(p) for p in model.parameters()} <= opt._fused_seen
    _assert_close(model, _reference(2))


def test_fuse_wgrad_inside_a_window_attaches_from_the_next_window():
    model = _model()
    opt = fastaccum.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), K, model=model)
    inputs = _inputs(2 * K)
    _micro_batch(model, opt, inputs[0])
    fastaccum.fuse_wgrad(model)
    assert all(m._wgrad_sink is None for m in model if isinstance(m, fastaccum.nn.Linear))
    for x in inputs[1:K]:
        _micro_batch(model, opt, x)
    assert not opt._fused_seen  # the first window ran unfused to its end
    for x in inputs[K:]:
        _micro_batch(model, opt, x)
    assert {id(p) for p in model.parameters()} <= opt._fused_seen
    _assert_close(model, _reference(2))


def test_a_fused_layer_unfrozen_by_add_param_group_is_attached():
    reference, model = _model(), fastaccum.fuse_wgrad(_model())
    runs = []
    for net in (reference, model):
        net[0].requires_grad_(False)
        trainable = [p for p in net.parameters() if p.requires_grad]
        opt = fastaccum.wrap(torch.optim.AdamW(trainable, lr=1e-2), K, model=net)
        for w, x in enumerate(_inputs(3 * K)):
            if w == K:  # the second window: the first layer joins
                net[0].requires_grad_(True)
                opt.add_param_group({"params": list(net[0].parameters())})
            _micro_batch(net, opt, x)
        runs.append(opt)
    assert model[0]._wgrad_sink is runs[1]
    assert id(model[0].weight) in runs[1]._fused_seen
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert copy.deepcopy(model)[0]._wgrad_sink is None  # copies leave the link out
