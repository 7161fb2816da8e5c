"""ActivationPolicy / save_activations: gradients against exact PyTorch, what is kept,
quantized or masked, determinism, unbiasedness of the gradients, bad input."""

import gc
import math
import weakref

import pytest
import torch

import fastaccum
from fastaccum.memory import ActivationPolicy, save_activations
from fastaccum.memory.policy import Encoder
from tests.helpers import assert_close_rel


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(48, 128),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.25),
        torch.nn.Linear(128, 128),
        torch.nn.GELU(),
        torch.nn.LayerNorm(128),
        torch.nn.Linear(128, 10),
    ).to(dtype)


def batch(n=64, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 48, generator=gen).to(dtype), torch.randint(0, 10, (n,), generator=gen)


def grads(model, x, y, policy=None, rng_seed=5):
    """Parameter gradients of the cross-entropy (dropout RNG fixed), under ``policy``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(rng_seed)
    if policy is None:
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        session = None
    else:
        with save_activations(policy) as session:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()  # outside the block: backward may run after it has closed
    return [p.grad.clone() for p in model.parameters()], session


def rel_error(got, want):
    num = sum((g.double() - w.double()).square().sum() for g, w in zip(got, want, strict=True))
    den = sum(w.double().square().sum() for w in want)
    return (num / den).sqrt().item()


def test_masks_alone_are_lossless():
    """bits=None with masks: ReLU outputs and dropout masks as 1-bit masks, gradients equal."""
    model = mlp()
    x, y = batch()
    exact, _ = grads(model, x, y)
    got, session = grads(model, x, y, ActivationPolicy(bits=None, min_bytes=1024))
    for g, e in zip(got, exact, strict=True):
        assert torch.equal(g, e)
    # The ReLU output and dropout's keep mask (0 or 1 / (1 - p)).
    assert session.stats.masks == 2
    assert session.stats.quantized == 0


@pytest.mark.parametrize("bits,bound", [(8, 0.02), (4, 0.25), (2, 1.0)])
def test_quantized_gradients_are_close_to_exact(bits, bound):
    model = mlp()
    x, y = batch(256)
    exact, _ = grads(model, x, y)
    got, session = grads(model, x, y, ActivationPolicy(bits=bits, min_bytes=4096))
    assert session.stats.quantized >= 4
    assert rel_error(got, exact) < bound


def test_error_grows_as_bits_shrink():
    model = mlp()
    x, y = batch(256)
    exact, _ = grads(model, x, y)
    errors = [
        rel_error(grads(model, x, y, ActivationPolicy(bits=b, min_bytes=0))[0], exact)
        for b in (8, 4, 2)
    ]
    assert 0 < errors[0] < errors[1] < errors[2]


def test_weight_gradient_is_unbiased_over_seeds():
    """dW of a Linear is linear in its saved input, so with stochastic rounding the mean of
    dW over many forward passes (each with its own rounding) converges to the exact dW;
    rounding to nearest does not."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 8)
    x = torch.randn(16, 256) * 2 + 1
    upstream = torch.randn(16, 8)

    def dw(policy):
        layer.zero_grad()
        with policy:
            out = layer(x)
        out.backward(upstream)
        return layer.weight.grad.double().clone()

    exact = dw(ActivationPolicy(bits=None))
    stochastic = ActivationPolicy(bits=2, min_bytes=0, seed=3)
    draws = 200
    mean = sum(dw(stochastic) for _ in range(draws)) / draws
    one = dw(ActivationPolicy(bits=2, min_bytes=0, seed=4))
    nearest = dw(ActivationPolicy(bits=2, min_bytes=0, stochastic_rounding=False))
    single_err = (one - exact).norm()
    # The error of a mean of independent unbiased draws shrinks like 1/sqrt(draws).
    assert (mean - exact).norm() < 3 * single_err / draws**0.5
    assert (nearest - exact).norm() > 3 * (mean - exact).norm()


def test_same_seed_is_bit_identical_and_sessions_draw_new_rounding():
    model = mlp()
    x, y = batch()
    a, _ = grads(model, x, y, ActivationPolicy(bits=4, min_bytes=0, seed=9))
    b, _ = grads(model, x, y, ActivationPolicy(bits=4, min_bytes=0, seed=9))
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    policy = ActivationPolicy(bits=4, min_bytes=0, seed=9)
    first, _ = grads(model, x, y, policy)
    second, _ = grads(model, x, y, policy)
    assert any(not torch.equal(u, v) for u, v in zip(first, second, strict=True))


def test_parameters_integers_and_small_tensors_are_kept():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(100, 64)
    lin = torch.nn.Linear(64, 64)
    idx = torch.randint(0, 100, (8, 32))
    with save_activations(ActivationPolicy(bits=8, min_bytes=0)) as s:
        h = lin(emb(idx))  # saves idx (int64), emb output, and the weight's view
    h.sum().backward()
    assert s.stats.quantized == 1  # only the embedding output
    assert s.stats.kept == 2  # indices and the transposed weight
    with save_activations(ActivationPolicy(bits=8, min_bytes=10**9)) as s:
        lin(emb(idx)).sum().backward()
    assert s.stats.quantized == 0


def test_autocast_weight_copies_are_kept():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64, requires_grad=True)
    policy = ActivationPolicy(bits=8, min_bytes=0)
    with torch.autocast("cpu", dtype=torch.bfloat16), save_activations(policy) as s:
        out = lin(x)
    out.float().sum().backward()
    # The bf16 input is quantized; the bf16 copy of the weight is the parameter's data.
    assert s.stats.quantized == 1
    assert x.grad is not None and lin.weight.grad is not None


def test_a_tensor_saved_twice_is_stored_once():
    x = torch.randn(64, 64, requires_grad=True)
    with save_activations(ActivationPolicy(bits=8, min_bytes=0)) as s:
        h = x * 2
        out = h * h  # mul saves h as self and as other
    out.sum().backward()
    assert s.stats.quantized == 1 and s.stats.reused == 1
    assert_close_rel(x.grad, 8 * x.detach(), 0.02)


def test_relu_output_needed_in_full_is_also_quantized():
    """ReLU stores a mask; the Linear that reads the same output stores its values."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(128, 64, requires_grad=True)
    for inplace in (False, True):
        with save_activations(ActivationPolicy(bits=8, min_bytes=0)) as s:
            h = torch.nn.functional.relu(x * 1.0, inplace=inplace)
            out = lin(h)
        out.sum().backward()
        assert s.stats.masks == 1 and s.stats.quantized == 1  # h, for the Linear


def test_float_zero_one_masks_are_stored_as_bits():
    x = torch.randn(128, 128, requires_grad=True)
    keep = (torch.rand(128, 128) > 0.5).float()
    with save_activations(ActivationPolicy(bits=8, min_bytes=0)) as s:
        out = x * keep
    out.sum().backward()
    assert s.stats.masks == 1
    assert torch.equal(x.grad, keep)


def test_layout_of_a_permuted_tensor_is_restored():
    enc = Encoder(ActivationPolicy(bits=8, min_bytes=0), 1)
    base = torch.randn(4, 8, 16, 32)
    t = base.permute(0, 2, 3, 1)  # dense, not contiguous
    out = enc.decode(enc.encode(t))
    assert out.shape == t.shape and out.stride() == t.stride()
    assert_close_rel(out, t, 0.01)
    gapped = torch.randn(64, 80)[:, :64]  # not dense: stored through a contiguous copy
    back = enc.decode(enc.encode(gapped))
    assert back.shape == gapped.shape
    assert_close_rel(back, gapped, 0.01)


def test_retain_graph_decodes_twice_to_the_same_values():
    model = mlp()
    x, y = batch()
    model.zero_grad()
    with save_activations(ActivationPolicy(bits=4, min_bytes=0)):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss.backward()
    for p, g in zip(model.parameters(), first, strict=True):
        assert torch.equal(p.grad, g)


def test_bf16_model():
    model = mlp(dtype=torch.bfloat16)
    x, y = batch(dtype=torch.bfloat16)
    exact, _ = grads(model, x, y)
    got, s = grads(model, x, y, ActivationPolicy(bits=8, min_bytes=0))
    assert s.stats.quantized > 0
    assert rel_error(got, exact) < 0.05


def test_offload_is_a_no_op_on_cpu():
    model = mlp()
    x, y = batch()
    plain, _ = grads(model, x, y, ActivationPolicy(bits=None, offload=True, min_bytes=0))
    exact, _ = grads(model, x, y)
    for g, e in zip(plain, exact, strict=True):
        assert torch.equal(g, e)
    a, s = grads(model, x, y, ActivationPolicy(bits=8, offload=True, min_bytes=0, seed=2))
    b, _ = grads(model, x, y, ActivationPolicy(bits=8, min_bytes=0, seed=2))
    assert s.stats.offloaded == 0 and s.stats.host_bytes == 0
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


def test_policy_is_a_context_manager_and_attaches_to_modules():
    model = mlp()
    x, y = batch()
    exact, _ = grads(model, x, y, ActivationPolicy(bits=8, min_bytes=4096, seed=1))
    policy = ActivationPolicy(bits=8, min_bytes=4096, seed=1)
    model.zero_grad()
    torch.manual_seed(5)
    with policy:
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for p, e in zip(model.parameters(), exact, strict=True):
        assert torch.equal(p.grad, e)
    # attach(): every forward of the module runs under a session of the policy.
    policy = ActivationPolicy(bits=8, min_bytes=4096, seed=1)
    handle = policy.attach(model)
    model.zero_grad()
    torch.manual_seed(5)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for p, e in zip(model.parameters(), exact, strict=True):
        assert torch.equal(p.grad, e)
    handle.remove()
    plain, _ = grads(model, x, y)
    assert rel_error(plain, exact) > 0  # detached: exact again


def test_hooks_are_removed_when_the_forward_raises():
    lin = torch.nn.Linear(8, 8)
    policy = ActivationPolicy(bits=8, min_bytes=0)
    handle = policy.attach(lin)
    with pytest.raises(RuntimeError):
        lin(torch.randn(3, 5))  # wrong width
    handle.remove()
    x = torch.randn(256, 8, requires_grad=True)
    out = lin(x)
    # No policy left installed: the saved input is the tensor itself.
    assert out.grad_fn._saved_mat1 is x


def test_top_level_exports():
    assert fastaccum.ActivationPolicy is ActivationPolicy
    assert fastaccum.save_activations is save_activations
    assert callable(fastaccum.checkpoint)
    assert fastaccum.memory.saved_bytes is not None


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"bits": 3}, ValueError, "bits must be 8, 4, 2 or None"),
        ({"bits": "8"}, TypeError, "bits must be an int or None"),
        ({"bits": True}, TypeError, "bits must be an int or None"),
        ({"group_size": 100}, ValueError, "group_size must be a power of two"),
        ({"min_bytes": -1}, ValueError, "min_bytes must be >= 0"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"pool": object()}, TypeError, "pool must be a PinnedPool"),
        ({"offload": "yes"}, TypeError, "offload must be a bool .* got str"),
        ({"stochastic_rounding": "no"}, TypeError, "stochastic_rounding must be a bool .* got str"),
        ({"masks": 1}, TypeError, "masks must be a bool .* got int"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ActivationPolicy(**kwargs)


def test_bad_use_raises():
    with pytest.raises(TypeError, match="policy must be an ActivationPolicy"):
        save_activations("8-bit")
    with pytest.raises(TypeError, match="either a policy or keyword arguments"):
        save_activations(ActivationPolicy(), bits=4)
    session = save_activations(bits=8)
    with session, pytest.raises(RuntimeError, match="entered once"):
        session.__enter__()
    with pytest.raises(RuntimeError, match="without a matching __enter__"):
        ActivationPolicy().__exit__(None, None, None)
    with pytest.raises(TypeError, match=r"must be a torch\.nn\.Module"):
        ActivationPolicy().attach(lambda x: x)


def test_relu_output_made_before_the_session_is_stored_in_full():
    """Only ReLU's own save may become a mask: a ReLU output computed outside the session
    and saved inside it by a Linear keeps its values (a mask would corrupt dW)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(128, 64, requires_grad=True)
    h = torch.relu(x * 1.0)
    with save_activations(ActivationPolicy(bits=None, min_bytes=0)) as s:
        out = lin(h)
    out.square().sum().backward()
    assert s.stats.masks == 0
    want = 2 * lin(h).detach().t() @ h.detach()
    assert_close_rel(lin.weight.grad, want, 1e-5)


def test_compiled_fused_model_under_a_policy():
    """A compiled model whose fused layers break its graph (fuse_wgrad + a wrapper), inside
    save_activations: the hooks run (eagerly, never traced) on what both the compiled
    graphs and the fused layers save, and the window's gradient stays within the 8-bit
    bound of the exact one."""
    x, y = batch(256)
    exact, _ = grads(mlp(), x, y)
    model = fastaccum.fuse_wgrad(mlp())
    compiled = torch.compile(model, backend="aot_eager")
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.0), 2, model=compiled)
    torch.manual_seed(5)
    with save_activations(ActivationPolicy(bits=8, min_bytes=4096)) as session:
        loss = torch.nn.functional.cross_entropy(compiled(x), y)
    opt.backward(loss)
    assert session.stats.quantized >= 2 and session.stats.masks >= 1
    got = [opt._accums[p] for p in model.parameters()]
    assert rel_error(got, exact) < 0.02


# --------------------------------------------------------------------------- trial fixes


@pytest.mark.parametrize("bits", [None, 8])
def test_a_negative_constant_input_keeps_its_value(bits):
    """A saved tensor that needs no gradient and holds one negative value everywhere is
    two-valued in no useful sense: a mask of x > 0 would decode it to zeros and dW to 0."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 16)
    x = torch.full((64, 128), -0.5)  # 32 KiB: the default min_bytes

    lin(x).pow(2).sum().backward()
    exact = lin.weight.grad.clone()
    lin.zero_grad()
    with save_activations(ActivationPolicy(bits=bits)) as s:
        out = lin(x)
    out.pow(2).sum().backward()
    assert s.stats.masks == 0
    assert torch.equal(lin.weight.grad, exact)

    w = torch.randn(256, 256, requires_grad=True)
    c = torch.full((256, 256), -2.0)  # saved by mul for d/dw
    ((w * 1.0) * c).square().sum().backward()
    exact = w.grad.clone()
    w.grad = None
    with save_activations(ActivationPolicy(bits=bits)):
        loss = ((w * 1.0) * c).square().sum()
    loss.backward()
    if bits is None:
        assert torch.equal(w.grad, exact)
    else:  # square's input is quantized
        assert_close_rel(w.grad, exact, 0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_every_constant_and_signed_zero_tensor_decodes_bit_exactly(dtype):
    """What autograd gets back is the saved tensor bit for bit (NaN, infinities and -0.0
    included), mask or not; 0/c tensors with c > 0 still become masks."""
    enc = Encoder(ActivationPolicy(bits=None, min_bytes=0), 1)
    rand = torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) > 0.5
    cases = [torch.full((64, 64), v, dtype=dtype) for v in (-0.5, -0.0, 0.0, 0.5)]
    cases += [torch.full((64, 64), v, dtype=dtype) for v in (math.nan, math.inf, -math.inf)]
    cases += [torch.where(rand, 3.0, v).to(dtype) for v in (-0.0, math.inf, -1.0, math.nan)]
    cases += [torch.where(rand, v, 0.0).to(dtype) for v in (-3.0, math.inf)]
    for t in cases:
        back = enc.decode(enc.encode(t))
        assert back.dtype == dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))
    masks = enc.stats.masks
    for t in [torch.where(rand, 2.5, 0.0).to(dtype), torch.zeros(64, 64, dtype=dtype)]:
        back = enc.decode(enc.encode(t))
        assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))
    assert enc.stats.masks == masks + 2


def _tanh_graph(w, policy):
    """tanh(a @ w), with tanh's saved output y returned for the caller to modify."""
    a = torch.randn(256, 64, requires_grad=True)
    x = a * 1.0
    if policy is None:
        y = torch.tanh(x @ w)
    else:
        with save_activations(policy):
            y = torch.tanh(x @ w)
    return y


INPLACE_POLICIES = {
    "bits=None (kept)": ActivationPolicy(bits=None),
    "bits=8 (quantized)": ActivationPolicy(bits=8),
    "large min_bytes (kept)": ActivationPolicy(bits=8, min_bytes=1 << 30),
}


@pytest.mark.parametrize("name", list(INPLACE_POLICIES))
def test_in_place_change_of_a_saved_tensor_raises_like_pytorch(name):
    torch.manual_seed(0)
    w = torch.randn(64, 64, requires_grad=True)
    match = "modified by an inplace operation"
    y = _tanh_graph(w, None)
    with torch.no_grad():
        y.mul_(0.0)
    with pytest.raises(RuntimeError, match=match):
        y.sum().backward()  # plain PyTorch, the reference
    y = _tanh_graph(w, INPLACE_POLICIES[name])
    with torch.no_grad():
        y.mul_(0.0)
    with pytest.raises(RuntimeError, match=rf"{match}.*shape \(256, 64\).*clone it"):
        y.sum().backward()
    # Unmodified, the same graph differentiates.
    w.grad = None
    _tanh_graph(w, INPLACE_POLICIES[name]).sum().backward()
    assert w.grad is not None


def test_in_place_change_of_a_parameter_or_mask_raises_like_pytorch():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(512, 64, requires_grad=True)
    for policy in (None, ActivationPolicy(bits=8, min_bytes=0)):
        with save_activations(policy) if policy else torch.enable_grad():
            loss = lin(torch.relu(x * 1.0)).sum()
        with torch.no_grad():
            lin.weight.add_(1.0)  # an optimizer step before backward
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        with save_activations(policy) if policy else torch.enable_grad():
            h = torch.relu(x * 1.0)  # ReLU saves its output (a mask under the policy)
            loss = h.sum()
        with torch.no_grad():
            h.neg_()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("bits", [None, 8])
def test_a_graph_dropped_without_backward_is_freed(bits):
    """An op saving its own output (tanh) under a policy that keeps it: the graph is freed
    when dropped, as in plain PyTorch (holding the tensor itself was a reference cycle
    through autograd's C++ nodes, never collected)."""
    x = torch.randn(1 << 16, requires_grad=True)
    # bits=None: stored raw, so kept; bits=8: kept for its size.
    kept = ActivationPolicy(bits=bits, min_bytes=0 if bits is None else 1 << 30)
    for policy in (None, kept):
        with save_activations(policy) if policy else torch.enable_grad():
            y = torch.tanh(x * 2)
        alive = weakref.ref(y)
        del y
        gc.collect()
        assert alive() is None


def _sparse_graph(layout):
    gen = torch.Generator().manual_seed(0)
    n = 500
    idx = torch.randint(0, n, (2, 4000), generator=gen)
    adj = torch.sparse_coo_tensor(idx, torch.rand(4000, generator=gen), (n, n)).coalesce()
    if layout == "csr":
        adj = adj.to_sparse_csr()
    return adj, torch.randn(n, 64, generator=gen)


@pytest.mark.filterwarnings("ignore:Sparse")
@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("bits", [None, 8])
def test_sparse_saved_tensors_are_kept(layout, bits):
    """torch.sparse.mm(adj, h) saves the sparse adj: kept as it is (it has no strided
    storage to compress); the dense h is compressed as usual."""
    adj, x = _sparse_graph(layout)
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    torch.sparse.mm(adj, lin(x)).relu().sum().backward()
    exact = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad()
    with save_activations(ActivationPolicy(bits=bits, min_bytes=0)) as s:
        loss = torch.sparse.mm(adj, lin(x)).relu().sum()
    loss.backward()
    if bits is None:
        assert all(torch.equal(p.grad, e) for p, e in zip(lin.parameters(), exact, strict=True))
    else:
        assert s.stats.quantized >= 1
        assert rel_error([p.grad for p in lin.parameters()], exact) < 0.02


def test_expanded_saved_tensor_is_kept_not_materialized():
    """x * g.expand(B, T, D) saves the stride-0 view (1 KiB of storage): compressing it
    would first copy it out to its dense size. Kept, the forward's peak memory is plain
    PyTorch's and the gradients are exact."""
    from fastaccum.memory import peak_bytes

    b, t, d = 16, 128, 256
    gate = torch.randn(1, 1, d, requires_grad=True)
    x = torch.randn(b, t, d, requires_grad=True)

    def forward(policy):
        with save_activations(policy) if policy else torch.enable_grad():
            return x * torch.sigmoid(gate * 2).expand(b, t, d)

    plain_peak, out = peak_bytes(lambda: forward(None), "cpu")
    out.sum().backward()
    exact = (x.grad.clone(), gate.grad.clone())
    x.grad = gate.grad = None
    peak, out = peak_bytes(lambda: forward(ActivationPolicy(bits=8)), "cpu")
    out.sum().backward()
    assert peak <= plain_peak
    assert torch.equal(x.grad, exact[0]) and torch.equal(gate.grad, exact[1])
