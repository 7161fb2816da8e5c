"""saved_bytes against bytes counted by hand, and the pinned buffer pool (CPU side)."""

import weakref

import pytest
import torch

import fastaccum
from fastaccum.memory import ActivationPolicy, PinnedPool, save_activations, saved_bytes
from fastaccum.memory.offload import _bucket
from fastaccum.ops.quantize import quantized_nbytes

N, D_IN, D_HID, D_OUT = 128, 32, 64, 16


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(D_IN, D_HID), torch.nn.ReLU(), torch.nn.Linear(D_HID, D_OUT)
    )


def test_counts_match_a_hand_count():
    """Plain PyTorch keeps the input (for dW1) and the ReLU output (saved by ReLU and by the
    second Linear: one storage), plus W2^T (a parameter, counted apart). W1^T is not saved:
    the input needs no gradient."""
    x = torch.randn(N, D_IN)
    plain = saved_bytes(model(), x)
    assert plain.total == 4 * (N * D_IN + N * D_HID)
    assert plain.parameters == 4 * D_HID * D_OUT
    assert plain.batch_size == N and plain.per_sample == plain.total / N
    assert plain.saved_tensors == 4

    policy = ActivationPolicy(bits=8, min_bytes=0, group_size=64)
    got = saved_bytes(model(), x, policy)
    expected = {
        "quantize": quantized_nbytes(N * D_IN, 8, 64) + quantized_nbytes(N * D_HID, 8, 64),
        "relu": N * D_HID // 8,
    }
    assert got.by_kind == expected
    assert got.total == sum(expected.values())
    assert got.parameters == plain.parameters


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_ratio_follows_the_format(bits):
    """For large activations the ratio is 4 bytes over bits / 8 + 8 / group_size."""
    x = torch.randn(512, D_IN)
    m = torch.nn.Sequential(torch.nn.Linear(D_IN, 256), torch.nn.GELU(), torch.nn.Linear(256, 8))
    plain = saved_bytes(m, x).total
    compressed = saved_bytes(m, x, ActivationPolicy(bits=bits, min_bytes=0)).total
    per_element = bits / 8 + 8 / 256
    assert plain / compressed == pytest.approx(4 / per_element, rel=0.02)


def test_batch_forms_and_errors():
    m = model()
    x = torch.randn(N, D_IN)
    assert saved_bytes(m, (x,)).total == saved_bytes(m, x).total
    wrapped = torch.nn.Module()
    wrapped.forward = lambda inp: m(inp)
    assert saved_bytes(wrapped, {"inp": x}).total == saved_bytes(m, x).total
    with pytest.raises(ValueError, match="no tensor with a batch dimension"):
        saved_bytes(m, (3,))
    with pytest.raises(TypeError, match="policy must be an ActivationPolicy"):
        saved_bytes(m, x, policy=8)


def test_graph_is_freed_and_nothing_is_differentiated():
    m = model()
    saved_bytes(m, torch.randn(N, D_IN))
    assert all(p.grad is None for p in m.parameters())


def test_pool_reuses_buffers_after_release():
    pool = PinnedPool(pin=False)
    a = pool.acquire(100_000)
    assert a.dtype == torch.uint8 and a.numel() == _bucket(100_000) >= 100_000
    pool.release(a)
    assert pool.idle_bytes == a.numel()
    b = pool.acquire(99_000)  # same size class
    assert b.data_ptr() == a.data_ptr()
    c = pool.acquire(99_000)  # none idle: a new one
    assert c.data_ptr() != b.data_ptr()
    assert pool.allocated_bytes == 2 * a.numel()
    pool.release(b)
    pool.release(c)
    pool.clear()
    assert pool.idle_bytes == 0 and pool.allocated_bytes == 0
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        pool.acquire(-1)


def test_size_classes_waste_at_most_a_quarter():
    for n in [1, 65_536, 65_537, 100_000, 3_000_001, 2**30 + 1]:
        size = _bucket(n)
        assert size >= n
        assert size <= max(65_536, n * 1.25)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_on_gpu_matches_and_moves_bytes_to_the_host():
    dev = torch.device("cuda")
    m = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)
    ).to(dev)
    x = torch.randn(512, 256, device=dev)
    pool = PinnedPool()

    def grads(policy):
        m.zero_grad()
        from fastaccum.memory import save_activations

        with save_activations(policy) as s:
            out = m(x)
        out.square().mean().backward()
        return [p.grad.clone() for p in m.parameters()], s

    exact, _ = grads(ActivationPolicy(bits=None, min_bytes=0))
    got, s = grads(ActivationPolicy(bits=None, offload=True, min_bytes=0, pool=pool))
    assert s.stats.offloaded > 0 and s.stats.stored_bytes == 0
    for g, e in zip(got, exact, strict=True):
        assert torch.equal(g, e)
    a, _ = grads(ActivationPolicy(bits=8, offload=True, min_bytes=0, seed=1, pool=pool))
    b, _ = grads(ActivationPolicy(bits=8, min_bytes=0, seed=1))
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    counted = saved_bytes(m, x, ActivationPolicy(bits=None, offload=True, min_bytes=0))
    assert counted.total == 0 and counted.host > 0
    torch.cuda.synchronize()
    assert pool.allocated_bytes > 0


# --------------------------------------------------------------------------- trial fixes


def graph_saved_bytes(out, params):
    """Plain PyTorch's figure, read from the graph itself: the bytes of the distinct
    storages its nodes hold as saved tensors, minus the parameters' own storages. 0-dim
    tensors are left out: Python scalars wrapped as tensors (``x * 2`` saves the 2), which
    autograd saves without calling the saved-tensor hooks."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    storages, nodes, seen = {}, [out.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                for t in value if isinstance(value, tuple | list) else [value]:
                    if isinstance(t, torch.Tensor) and t.dim() > 0:
                        storage = t.untyped_storage()
                        if storage.data_ptr() not in skip:
                            storages[storage.data_ptr()] = storage.nbytes()
        nodes.extend(f for f, _ in node.next_functions)
    return sum(storages.values())


def test_plain_figure_matches_the_graph():
    m = model()
    x = torch.randn(N, D_IN)
    assert saved_bytes(m, x).total == graph_saved_bytes(m(x), m.parameters())


def test_autocast_weight_copies_are_counted_in_total():
    """Under bf16 autocast the graph holds bf16 copies of the weights: new memory, counted
    in total (under by_kind["cast"]), as the graph walk of plain PyTorch counts it."""
    m = torch.nn.Sequential(
        torch.nn.Linear(D_IN, D_HID), torch.nn.Linear(D_HID, D_HID), torch.nn.Linear(D_HID, 8)
    )
    x = torch.randn(N, D_IN)

    def forward(inp):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(inp)

    got = saved_bytes(forward, x)
    assert got.total == graph_saved_bytes(forward(x), m.parameters())
    # The first layer's weight is not saved (its input needs no gradient); the next two are.
    assert got.by_kind["cast"] == 2 * (D_HID * D_HID + D_HID * 8)
    assert got.parameters == 0


@pytest.mark.filterwarnings("ignore:Sparse")
def test_sparse_saved_tensor_counts_its_indices_and_values():
    n, nnz = 500, 4000
    idx = torch.randint(0, n, (2, nnz), generator=torch.Generator().manual_seed(0))
    adj = torch.sparse_coo_tensor(idx, torch.rand(nnz), (n, n)).coalesce()
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(n, 64)
    dense = 4 * n * 64  # x, for dW; sparse.mm saves adj (for the gradient of lin(x))
    csr = adj.to_sparse_csr()
    coo_parts = [adj._indices(), adj._values()]
    csr_parts = [csr.crow_indices(), csr.col_indices(), csr.values()]
    for a, parts in ((adj, coo_parts), (csr, csr_parts)):
        stored = sum(t.untyped_storage().nbytes() for t in parts)
        assert saved_bytes(lambda a: torch.sparse.mm(a, lin(x)), a).total == stored + dense
        policy = ActivationPolicy(bits=8, min_bytes=0)
        compressed = saved_bytes(lambda a: torch.sparse.mm(a, lin(x)), a, policy)
        assert compressed.total < stored + dense / 3


@pytest.mark.parametrize("how", ["attach", "wrap"])
def test_a_policy_attached_to_the_model_is_measured(how):
    """After wrap(..., activations=policy) (which attaches it), saved_bytes still measures:
    without policy= what the attached policy stores, with policy= what that one would."""
    m = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    x = torch.randn(64, 256)
    policy = ActivationPolicy(bits=8)
    other = ActivationPolicy(bits=4, min_bytes=0)
    plain, with_policy, with_other = (saved_bytes(m, x, p) for p in (None, policy, other))
    assert with_policy.total < plain.total / 3
    if how == "attach":
        handle = policy.attach(m)
    else:
        opt = fastaccum.wrap(
            torch.optim.SGD(m.parameters(), lr=0.1), 2, model=m, activations=policy
        )
    assert saved_bytes(m, x) == with_policy
    assert saved_bytes(m, x, policy) == with_policy
    assert saved_bytes(m, x, other) == with_other
    if how == "attach":
        handle.remove()
    else:
        del opt
    # The model's own session is counted too.
    with_inner = saved_bytes(lambda t: _inner_session(m, t, policy), x)
    assert with_inner.total == with_policy.total


def _inner_session(m, x, policy):
    with save_activations(policy):
        return m(x)


def test_expanded_saved_tensor_is_not_counted_larger_under_a_policy():
    b, t, d = 16, 128, 256
    gate = torch.randn(1, 1, d, requires_grad=True)

    def forward(x):
        return x * torch.sigmoid(gate * 2).expand(b, t, d)  # saves the stride-0 view

    x = torch.randn(b, t, d, requires_grad=True)
    plain = saved_bytes(forward, x)
    assert plain.total == graph_saved_bytes(forward(x), [x, gate]) == 4 * d
    for bits in (None, 8, 4):
        assert saved_bytes(forward, x, ActivationPolicy(bits=bits)).total <= plain.total


def test_measuring_does_not_shift_the_rounding_seeds():
    """A seeded run after saved_bytes(..., policy=p) rounds as one without it."""
    lin = torch.nn.Linear(256, 64)
    x = torch.randn(64, 256)

    def weight_grad(measure_first):
        policy = ActivationPolicy(bits=4, min_bytes=0, seed=1)
        if measure_first:
            saved_bytes(lin, x, policy)
        lin.zero_grad()
        with save_activations(policy):
            out = lin(x.clone())
        out.sum().backward()
        return lin.weight.grad.clone()

    assert torch.equal(weight_grad(True), weight_grad(False))


def test_the_measured_graph_is_freed():
    """The graph is freed when saved_bytes returns, also for tensors an op saves of its
    own output (tanh): the counting hooks hold nothing that refers back to the graph."""
    outputs = []

    def forward(x):
        y = torch.tanh(x * 2)
        outputs.append(weakref.ref(y))
        return y

    x = torch.randn(256, 256, requires_grad=True)
    for policy in (None, ActivationPolicy(bits=None, min_bytes=0)):
        saved_bytes(forward, x, policy)
        assert outputs.pop()() is None


def test_bad_inputs_say_what_is_expected():
    m = model()
    with pytest.raises(TypeError, match=r"example_batch must be a tensor .* got float"):
        saved_bytes(m, 3.0)
    with pytest.raises(TypeError, match="model must be callable"):
        saved_bytes("model", torch.randn(N, D_IN))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        saved_bytes(m, torch.randn(N, D_IN))
