"""fastaccum.checkpoint: exact gradients without a policy, dropout replay, composition with
a compressing policy, determinism of recomputation, bad use."""

import pytest
import torch

import fastaccum
from fastaccum.memory import ActivationPolicy, checkpoint, save_activations, saved_bytes
from tests.helpers import assert_close_rel


class Blocks(torch.nn.Module):
    """Residual MLP blocks with dropout; ``ckpt`` runs each block through checkpoint."""

    def __init__(self, ckpt=False, width=64, depth=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.ckpt = ckpt
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.LayerNorm(width),
                torch.nn.Linear(width, 4 * width),
                torch.nn.ReLU(),
                torch.nn.Dropout(0.1),
                torch.nn.Linear(4 * width, width),
            )
            for _ in range(depth)
        )

    def forward(self, h):
        for block in self.blocks:
            h = h + (checkpoint(block, h) if self.ckpt else block(h))
        return h


def run(model, x, policy=None, seed=3):
    """Gradients of the parameters and of the input, dropout RNG fixed."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)
    if policy is None:
        out = model(x)
    else:
        with save_activations(policy):
            out = model(x)
    out.square().mean().backward()
    return [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]


X = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))


def test_checkpoint_without_policy_is_exact_with_dropout():
    exact = run(Blocks(), X)
    got = run(Blocks(ckpt=True), X)
    for g, e in zip(got, exact, strict=True):
        assert torch.equal(g, e)


def test_checkpoint_with_lossless_policy_is_exact():
    exact = run(Blocks(), X)
    got = run(Blocks(ckpt=True), X, ActivationPolicy(bits=None, min_bytes=0))
    for g, e in zip(got, exact, strict=True):
        assert torch.equal(g, e)


def test_checkpoint_with_8_bits_is_close_and_saves_less():
    exact = run(Blocks(), X)
    got = run(Blocks(ckpt=True), X, ActivationPolicy(bits=8, min_bytes=0))
    for g, e in zip(got, exact, strict=True):
        assert_close_rel(g, e, 0.1)
    plain = saved_bytes(Blocks(), X)
    ckpt = saved_bytes(Blocks(ckpt=True), X)
    both = saved_bytes(Blocks(ckpt=True), X, ActivationPolicy(bits=8, min_bytes=0))
    # Checkpointing keeps only each block's input; 8 bits shrink those about 4x.
    assert ckpt.total < plain.total / 4
    assert both.total < ckpt.total / 3


def test_recomputation_stores_through_the_policy():
    """The recomputed tensors are quantized too: the gradients of a 2-bit region differ
    from those of a lossless one even when the region's input is kept exactly."""
    model = Blocks(ckpt=True, depth=1)
    x = X.detach().requires_grad_()
    torch.manual_seed(3)
    out = checkpoint(model.blocks[0], x, policy=ActivationPolicy(bits=2, min_bytes=0))
    out.square().mean().backward()
    lossy = x.grad.clone()
    exact = run(Blocks(depth=1), X)[-1]
    assert not torch.allclose(lossy, exact, rtol=1e-3, atol=1e-6)
    assert_close_rel(lossy, exact, 1.0)


def test_repeated_recomputation_is_bit_identical():
    model = Blocks(ckpt=True)
    x = X.detach().requires_grad_()
    torch.manual_seed(3)
    with save_activations(ActivationPolicy(bits=4, min_bytes=0)):
        out = model(x).square().mean()
    first = torch.autograd.grad(out, [x, *model.parameters()], retain_graph=True)
    second = torch.autograd.grad(out, [x, *model.parameters()])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_kwargs_non_tensor_arguments_and_inputs_without_grad():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)

    def fn(a, scale, *, bias):
        return torch.relu(lin(a) * scale + bias)

    a = torch.randn(8, 16)  # needs no gradient
    bias = torch.randn(16, requires_grad=True)
    out = checkpoint(fn, a, 2.0, bias=bias)
    out.sum().backward()
    got = (lin.weight.grad.clone(), bias.grad.clone())
    lin.zero_grad()
    bias.grad = None
    fn(a, 2.0, bias=bias).sum().backward()
    assert torch.equal(got[0], lin.weight.grad) and torch.equal(got[1], bias.grad)


def test_nested_checkpoint_runs_as_part_of_the_outer_region():
    model = Blocks()
    exact = run(model, X)

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Blocks(ckpt=True)

        def forward(self, h):
            return checkpoint(self.inner, h)

    got = run(Outer(), X)
    for g, e in zip(got, exact, strict=True):
        assert torch.equal(g, e)


def test_changed_recomputation_raises():
    calls = []

    def fn(a):
        calls.append(1)
        return a.exp() if len(calls) == 1 else a.exp().sin()

    a = torch.randn(10, requires_grad=True)
    out = checkpoint(fn, a)
    with pytest.raises(RuntimeError, match="saved 2 tensors when recomputed but 1"):
        out.sum().backward()


def test_no_grad_and_bad_arguments():
    with torch.no_grad():
        assert checkpoint(torch.exp, torch.zeros(3)).sum().item() == 3.0
    with pytest.raises(TypeError, match="fn must be callable"):
        checkpoint(3, torch.zeros(3))
    with pytest.raises(TypeError, match="policy must be an ActivationPolicy"):
        checkpoint(torch.exp, torch.zeros(3), policy=8)
    assert fastaccum.checkpoint is checkpoint


def test_region_ending_in_relu_feeds_the_next_layer_exactly():
    """The region's ReLU output is saved outside the region (region input of the next one,
    and by the head) with its full values, not as ReLU's mask."""
    torch.manual_seed(0)
    stage = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(inplace=True))
    head = torch.nn.Linear(64, 8)

    def forward(x, ckpt):
        h = checkpoint(stage, x) if ckpt else stage(x)
        h = checkpoint(stage, h) if ckpt else stage(h)
        return head(h).square().mean()

    x = X.detach().requires_grad_()
    forward(x, False).backward()
    exact = [p.grad.clone() for p in [*stage.parameters(), *head.parameters(), x]]
    for p in [*stage.parameters(), *head.parameters(), x]:
        p.grad = None
    with save_activations(ActivationPolicy(bits=None, min_bytes=0)):
        loss = forward(x, True)
    loss.backward()
    for p, e in zip([*stage.parameters(), *head.parameters(), x], exact, strict=True):
        assert torch.equal(p.grad, e)


@pytest.mark.parametrize("policy", [None, ActivationPolicy(bits=8, min_bytes=0)])
def test_in_place_change_after_forward_raises_like_pytorch(policy):
    """A parameter or a region input modified in place between forward and backward: plain
    PyTorch (no checkpoint) raises, and so does the checkpointed region, rather than
    recompute from the new values."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    match = "modified by an inplace operation"
    for ckpt in (False, True):
        h = X.detach().requires_grad_() * 1.0  # the weight is saved for its gradient
        with save_activations(policy) if policy else torch.enable_grad():
            out = checkpoint(lin, h) if ckpt else lin(h)
        with torch.no_grad():
            lin.weight.mul_(2.0)
        with pytest.raises(RuntimeError, match=match):
            out.sum().backward()
        h = X.detach().requires_grad_() * 1.0
        with save_activations(policy) if policy else torch.enable_grad():
            out = checkpoint(lin, h) if ckpt else lin(h)
        with torch.no_grad():
            h.add_(1.0)
        with pytest.raises(RuntimeError, match=match):
            out.sum().backward()
