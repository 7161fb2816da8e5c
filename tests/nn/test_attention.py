"""fuse_wgrad on nn.MultiheadAttention: self-attention gives torch's results bit for bit,
and under fastaccum.wrap + opt.backward both projections add their weight gradients into
the accumulators (no dW made); every other call runs torch's own forward."""

import pytest
import torch
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import fastaccum
from fastaccum import _backend
from fastaccum.nn import MultiheadAttention, fuse_wgrad
from fastaccum.workloads import allocated_shapes
from tests.helpers import PythonRouteWrapper, assert_close_rel, split_windows

EMBED, HEADS, FF = 48, 4, 80
MASKS = ["none", "causal", "bool_causal", "padding", "causal_padding"]


def encoder(seed=0, batch_first=True, dropout=0.0):
    torch.manual_seed(seed)
    return torch.nn.TransformerEncoderLayer(
        EMBED, HEADS, FF, dropout=dropout, batch_first=batch_first
    )


def masks(kind, batch, seq, dtype=torch.float32):
    """TransformerEncoderLayer keyword arguments of one mask configuration; float masks
    in ``dtype``."""
    causal = torch.nn.Transformer.generate_square_subsequent_mask(seq, dtype=dtype)
    padding = torch.zeros(batch, seq, dtype=torch.bool)
    padding[0, seq // 2 :] = True  # the first sequence is padded after its middle
    return {
        "none": {},
        "causal": {"src_mask": causal, "is_causal": True},
        "bool_causal": {"src_mask": causal.isinf()},
        "padding": {"src_key_padding_mask": padding},
        "causal_padding": {"src_mask": causal, "src_key_padding_mask": padding.to(dtype)},
    }[kind]


def batches(n, seed=1):
    """(x, y) of shape (3, seq, EMBED), seq varying from 2 to 9."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = int(torch.randint(2, 10, (1,), generator=gen))
        x, y = (torch.randn(3, seq, EMBED, generator=gen) for _ in range(2))
        out.append((x, y))
    return out


def test_fuse_wgrad_switches_attention_keeping_keys_and_classes():
    model = encoder()
    keys = list(model.state_dict())
    fuse_wgrad(model)
    assert type(model.self_attn) is MultiheadAttention
    assert isinstance(model.self_attn.out_proj, NonDynamicallyQuantizableLinear)
    assert isinstance(model.self_attn.out_proj, fastaccum.nn.Linear)
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", MASKS)
def test_forward_is_torchs_bit_for_bit(kind, batch_first):
    """With a sink attached (the fused route), every mask configuration gives torch's
    output exactly, and backward writes the accumulators instead of .grad."""
    model, plain = encoder(batch_first=batch_first), encoder(batch_first=batch_first)
    fuse_wgrad(model)
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    x = torch.randn(3, 7, EMBED)
    if not batch_first:
        x = x.transpose(0, 1)
    out = model(x, **masks(kind, 3, 7))
    assert torch.equal(out, plain(x, **masks(kind, 3, 7)))
    opt.backward(out.square().mean())
    attn = model.self_attn
    for p in (attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight):
        assert p.grad is None and opt._accums[p].abs().sum() > 0


def test_dropout_draws_the_same_random_numbers():
    model, plain = encoder(dropout=0.3), encoder(dropout=0.3)
    fuse_wgrad(model)
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    assert model.self_attn._wgrad_sink is opt  # the fused route
    x = torch.randn(3, 7, EMBED)
    torch.manual_seed(5)
    fused = model(x)
    torch.manual_seed(5)
    assert torch.equal(fused, plain(x))


def float64_large_batch(data, k, kind):
    """The reference: the plain encoder layer in float64, SGD with momentum, one backward
    per window on the mean over every position of the window."""
    ref = encoder().double()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for window in split_windows(data, k):
        total = sum(x.shape[0] * x.shape[1] for x, _ in window)
        loss = 0
        for x, y in window:
            out = ref(x.double(), **masks(kind, x.shape[0], x.shape[1], torch.float64))
            loss = loss + (out - y.double()).square().mean(-1).sum()
        (loss / total).backward()
        opt.step()
        opt.zero_grad()
    return ref


@pytest.mark.parametrize("route", ["cpp", "python"])
@pytest.mark.parametrize("kind", ["none", "causal_padding"])
def test_training_matches_the_float64_large_batch(route, kind):
    """Windows of uneven micro-batches (num_items) through both routes train as one
    large batch in float64; no parameter is left holding a .grad, and the projections'
    weights never had one (the fused set)."""
    if route == "cpp" and not _backend.has_extension():
        pytest.skip("C++ extension not built (FASTACCUM_NO_EXT=1)")
    k = 3
    data = batches(2 * k, seed=7)
    ref = float64_large_batch(data, k, kind)
    model = fuse_wgrad(encoder())
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapper = PythonRouteWrapper if route == "python" else fastaccum.AccumulatingOptimizer
    opt = wrapper(inner, k, model=model)
    for x, y in data:
        out = model(x, **masks(kind, x.shape[0], x.shape[1]))
        opt.backward((out - y).square().mean(), num_items=x.shape[0] * x.shape[1])
        assert all(p.grad is None for p in model.parameters())
        opt.step()
    attn = model.self_attn
    projections = [attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight]
    projections += [attn.out_proj.bias, model.linear1.weight, model.linear2.weight]
    assert {id(p) for p in projections} <= opt._fused_seen
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_no_projection_weight_gradient_is_made(fused):
    """The fused path allocates no [3E, E] or [E, E] tensor during backward; the unfused
    one does (which shows the check can fail)."""
    model = encoder()
    if fused:
        fuse_wgrad(model)
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    x = torch.randn(2, 5, EMBED)
    opt.backward(model(x).square().mean())  # first call creates the accumulators
    opt.step()
    loss = model(x).square().mean()
    shapes = [shape for shape, _ in allocated_shapes(lambda: opt.backward(loss))]
    weight_shaped = [s for s in shapes if s in {(3 * EMBED, EMBED), (EMBED, EMBED)}]
    assert (weight_shaped == []) == fused


def _runs_a_fused_gemm(out):
    """True when ``out``'s autograd graph holds a fused projection (the C++ op or the
    Python route's function)."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        if "CppFunction" in name or "FusedWgradLinear" in name:
            return True
        todo.extend(fn for fn, _ in node.next_functions)
    return False


def test_other_calls_run_torchs_forward():
    """Attention weights, cross-attention and unbatched input take torch's own forward,
    with torch's results and no fused projection in their graph; self-attention without
    weights has one (which shows the check can fail)."""
    model, plain = fuse_wgrad(encoder()).self_attn, encoder().self_attn
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    assert model._wgrad_sink is opt
    x, memory = torch.randn(3, 7, EMBED), torch.randn(3, 4, EMBED)
    for args, kwargs, fused in [
        ((x, x, x), {"need_weights": False}, True),
        ((x, x, x), {}, False),  # need_weights=True by default
        ((x, memory, memory), {"need_weights": False}, False),
        ((x[0], x[0], x[0]), {"need_weights": False}, False),
    ]:
        out, weights = model(*args, **kwargs)
        ref_out, ref_weights = plain(*args, **kwargs)
        assert torch.equal(out, ref_out)
        assert (weights is None) == (ref_weights is None)
        assert _runs_a_fused_gemm(out) == fused


def test_is_causal_without_a_mask_is_refused_as_torch_refuses_it():
    model = fuse_wgrad(encoder())
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    assert model.self_attn._wgrad_sink is opt
    x = torch.randn(2, 5, EMBED)
    with pytest.raises(RuntimeError, match="is_causal"):
        model.self_attn(x, x, x, need_weights=False, is_causal=True)


def test_autocast_bf16_matches_torch():
    model, plain = fuse_wgrad(encoder()), encoder()
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    x = torch.randn(3, 7, EMBED)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, **masks("causal", 3, 7))
        ref = plain(x, **masks("causal", 3, 7))
    assert torch.equal(out, ref)
    opt.backward(out.float().square().mean())
    assert model.self_attn.in_proj_weight.grad is None
