"""fastaccum.nn.Embedding / fuse_wgrad(embeddings=True): same results as nn.Embedding; under
fastaccum.wrap + opt.backward the looked-up rows' gradients go into the accumulator and no
dense [vocab, dim] gradient is made."""

import copy

import pytest
import torch

import fastaccum
from fastaccum import _backend
from fastaccum.nn import Embedding, Linear, fuse_wgrad
from fastaccum.workloads import allocated_shapes
from tests.helpers import PythonRouteWrapper, assert_close_rel, split_windows

needs_ext = pytest.mark.skipif(
    not _backend.has_extension(), reason="C++ extension not built (FASTACCUM_NO_EXT=1)"
)

VOCAB, DIM, PAD = 37, 12, 0


class TinyLM(torch.nn.Module):
    """Embedding -> tanh -> Linear head, optionally tied to the embedding."""

    def __init__(self, seed=0, tied=False):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(VOCAB, DIM, padding_idx=PAD)
        self.pos = torch.nn.Embedding(8, DIM)
        self.head = torch.nn.Linear(DIM, VOCAB, bias=not tied)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        return self.head(torch.tanh(self.emb(idx) + self.pos(pos)))


def token_windows(n, seed=1):
    """(tokens, targets) micro-batches of varying length, with padding and repeats."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = int(torch.randint(2, 9, (1,), generator=gen))
        idx = torch.randint(0, 6, (3, seq), generator=gen)  # few ids: many repeats, PAD too
        out.append((idx, torch.randint(0, VOCAB, (3, seq), generator=gen)))
    return out


def token_loss(model, idx, tgt):
    return torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), tgt.flatten())


def test_fuse_wgrad_swaps_plain_embeddings_only():
    model = TinyLM()
    odd = torch.nn.ModuleList(
        [
            torch.nn.Embedding(5, 3, max_norm=1.0),
            torch.nn.Embedding(5, 3, scale_grad_by_freq=True),
            torch.nn.Embedding(5, 3, sparse=True),
        ]
    )
    model.odd = odd
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert fuse_wgrad(model) is model
    assert type(model.emb) is Embedding and type(model.pos) is Embedding
    assert all(type(m) is torch.nn.Embedding for m in model.odd)
    assert list(model.state_dict()) == keys
    idx = torch.randint(0, VOCAB, (2, 5))
    assert torch.equal(model(idx), ref(idx))
    assert type(fuse_wgrad(TinyLM(), embeddings=False).emb) is torch.nn.Embedding


def test_direct_use_refuses_unsupported_options():
    layer = Embedding(5, 3, max_norm=1.0)
    with pytest.raises(ValueError, match=r"max_norm=1\.0"):
        layer(torch.tensor([1, 2]))


def test_without_a_sink_gradients_match_nn_embedding():
    model, ref = fuse_wgrad(TinyLM()), TinyLM()
    idx, tgt = token_windows(1)[0]
    token_loss(model, idx, tgt).backward()
    token_loss(ref, idx, tgt).backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p.grad, q.grad, 1e-6)
    assert model.emb.weight.grad[PAD].abs().max() == 0  # the padding row gets nothing


@pytest.mark.parametrize("route", ["cpp", "python", "compiled"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_fused_wrapper_training_matches_large_batch(kind, tied, route):
    """Both routes, and the model under torch.compile (the fused layers run eagerly
    between graphs), train as the float64 large batch, the fused layers writing the
    accumulators themselves."""

    def make_opt(params):
        if kind == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9)
        return torch.optim.AdamW(params, lr=1e-2)

    k = 3
    data = token_windows(3 * k - 1)
    ref = TinyLM(tied=tied).double()
    ref_opt = make_opt(ref.parameters())
    for window in split_windows(data, k):
        total = sum(idx.numel() for idx, _ in window)
        loss = sum(token_loss(ref, i, t) * i.numel() for i, t in window) / total
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()

    model = fuse_wgrad(TinyLM(tied=tied))
    assert type(model.head) is Linear
    if route != "python" and not _backend.has_extension():
        pytest.skip("C++ extension not built (FASTACCUM_NO_EXT=1)")
    wrapper = PythonRouteWrapper if route == "python" else fastaccum.AccumulatingOptimizer
    run = torch.compile(model, backend="aot_eager") if route == "compiled" else model
    opt = wrapper(make_opt(model.parameters()), k, model=run, max_grad_norm=100.0)
    grad_fn = type(model.emb(data[0][0]).grad_fn).__name__
    assert ("CppFunction" in grad_fn) == (route != "python")
    for idx, tgt in data:
        opt.backward(token_loss(run, idx, tgt), num_items=idx.numel())
        assert model.emb.weight.grad is None  # nothing lands in .grad
        opt.step()
    opt.flush()
    assert {id(model.emb.weight), id(model.pos.weight), id(model.head.weight)} <= (opt._fused_seen)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def test_loss_backward_path_stays_correct_unfused():
    """With loss.backward() the micro-batch weight is unknown during backward: the layer
    makes .grad as nn.Embedding does and step() folds it."""
    data = token_windows(4, seed=3)
    model = fuse_wgrad(TinyLM())
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 4, model=model)
    ref = TinyLM()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for idx, tgt in data:
        token_loss(model, idx, tgt).backward()
        assert model.emb.weight.grad is not None
        opt.step()
        (token_loss(ref, idx, tgt) / 4).backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p, q, 1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_no_vocab_sized_gradient_is_made(fused):
    """The fused path allocates no [vocab, dim] tensor during backward; the unfused one
    does (which shows the check can fail)."""
    torch.manual_seed(0)
    vocab = 1000
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 24), torch.nn.Linear(24, 5))
    if fused:
        fuse_wgrad(model)
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    idx = torch.randint(0, vocab, (4, 6))
    opt.backward(model(idx).square().mean())  # first call creates the accumulators
    opt.step()
    loss = model(idx).square().mean()
    shapes = [shape for shape, _ in allocated_shapes(lambda: opt.backward(loss))]
    vocab_sized = [s for s in shapes if s == (vocab, 24)]
    if fused:
        assert vocab_sized == []
    else:
        assert len(vocab_sized) >= 1


# --------------------------------------------------------------------------- embedding_wgrad


def _embedding_case(seed, padding):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(VOCAB, DIM, generator=gen, requires_grad=True)
    idx = torch.randint(0, 6, (3, 7), generator=gen)  # repeats, and PAD when padding
    go = torch.randn(DIM, 7, 3, generator=gen).permute(2, 1, 0)  # non-contiguous
    return weight, idx, go, (PAD if padding else -1)


def _dense_grad(idx, go, padding):
    """float64 d(sum(out * go))/d(weight) of a lookup, padding row left at zero."""
    want = torch.zeros(VOCAB, DIM, dtype=torch.float64)
    for i, row in zip(idx.reshape(-1).tolist(), go.reshape(-1, DIM).double(), strict=True):
        if i != padding:
            want[i] += row
    return want


@needs_ext
@pytest.mark.parametrize("padding", [True, False])
def test_embedding_wgrad_op_off_is_nn_embedding(padding):
    weight, idx, go, pad = _embedding_case(1, padding)
    accum, control = torch.zeros(VOCAB, DIM), torch.zeros(3, dtype=torch.float64)
    out = torch.ops.fastaccum.embedding_wgrad(idx, weight, pad, accum, control, 0)
    assert torch.equal(out, torch.nn.functional.embedding(idx, weight.detach()))
    out.backward(go)
    assert_close_rel(weight.grad, _dense_grad(idx, go, pad), 1e-6)
    assert not accum.any() and control.tolist() == [0.0, 0.0, 0.0]


@needs_ext
@pytest.mark.parametrize("padding", [True, False])
def test_embedding_wgrad_op_on_accumulates_and_counts(padding):
    weight, idx, go, pad = _embedding_case(2, padding)
    accum = torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(3))
    start = accum.clone()
    control = torch.tensor([2.5, 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.ops.fastaccum.embedding_wgrad(idx, weight, pad, accum, control, 1).backward(go)
    assert_close_rel(accum, start.double() + 2.5 * _dense_grad(idx, go, pad), 1e-6)
    assert weight.grad is None
    if padding:
        assert torch.equal(accum[PAD], start[PAD])
    assert control.tolist() == [2.5, 1.0, 0.0, 1.0]


@needs_ext
def test_embedding_wgrad_op_bad_input_raises_and_changes_nothing():
    weight, idx, _, _ = _embedding_case(4, True)
    accum = torch.zeros(VOCAB, DIM)
    ok = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    cases = [
        ((idx, weight, 0, accum, ok[:2], 0), "slot 0 is out of range"),
        ((idx, weight, 0, torch.zeros(VOCAB, DIM + 1), ok, 0), "weight_accum must match"),
        ((idx, weight, 0, accum.half(), ok, 0), "weight_accum must be float32"),
        ((idx, weight, VOCAB, accum, ok, 0), "padding_idx must be < num_embeddings"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.fastaccum.embedding_wgrad(*args)
        assert not accum.any() and ok.tolist() == [1.0, 0.0, 0.0]


@needs_ext
def test_opcheck_embedding_wgrad():
    """Schema, autograd registration and fake tensors (the AOT tests are left out, as for
    linear_wgrad: the backward reads control on the host)."""
    weight, idx, _, _ = _embedding_case(5, True)
    control = torch.zeros(3, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.fastaccum.embedding_wgrad.default,
        (idx, weight, PAD, torch.zeros(VOCAB, DIM), control, 0),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
