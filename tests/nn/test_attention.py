"""fuse_wgrad on nn.MultiheadAttention: self-attention, cross-attention, attention weights
and unbatched input give torch's results bit for bit, and under fastaccum.wrap +
opt.backward the input and output projections add their weight gradients into the
accumulators (no dW made); the module layouts it does not fuse, and input torch
rejects, run torch's own forward."""

import re

import pytest
import torch
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import fastaccum
from fastaccum import _backend
from fastaccum.nn import MultiheadAttention, fuse_wgrad
from fastaccum.workloads import allocated_shapes
from tests.helpers import PythonRouteWrapper, assert_close_rel, split_windows

EMBED, HEADS, FF = 48, 4, 80
MASKS = ["none", "causal", "bool_causal", "padding", "causal_padding", "causal_hint_padding"]
ARCHS = ["encoder", "transformer", "weights"]


class CrossAttentionWithWeights(torch.nn.Module):
    """Cross-attention as users write it: ``attn(x, memory, memory)`` with torch's default
    ``need_weights=True``, the attention weights feeding the output."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(EMBED, HEADS, dropout=dropout, batch_first=True)
        self.norm = torch.nn.LayerNorm(EMBED)

    def forward(self, x, memory, key_padding_mask=None):
        out, weights = self.attn(x, memory, memory, key_padding_mask=key_padding_mask)
        return self.norm(out + weights @ memory)


def build(arch="encoder", seed=0, batch_first=True, dropout=0.0):
    """A small model whose attention is ``arch``: an encoder layer (self-attention), a
    one-layer ``nn.Transformer`` (decoder self- and cross-attention) or
    :class:`CrossAttentionWithWeights`."""
    torch.manual_seed(seed)
    if arch == "encoder":
        return torch.nn.TransformerEncoderLayer(
            EMBED, HEADS, FF, dropout=dropout, batch_first=batch_first
        )
    if arch == "transformer":
        return torch.nn.Transformer(EMBED, HEADS, 1, 1, FF, dropout=dropout, batch_first=True)
    return CrossAttentionWithWeights(dropout)


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
        "causal_hint_padding": {
            "src_mask": causal,
            "is_causal": True,
            "src_key_padding_mask": padding.to(dtype),
        },
    }[kind]


def run(arch, model, x, kind="none", dtype=torch.float32):
    """``model``'s output for the micro-batch ``x`` [batch, seq, EMBED]: the encoder maps
    ``x``; the transformer maps ``x`` (source) and ``x[:, :-1]`` (target) to
    [batch, seq - 1, EMBED]; the cross-attention block attends from ``x[:, :-1]`` over
    ``x`` (the memory)."""
    batch, seq = x.shape[:2]
    if arch == "encoder":
        return model(x, **masks(kind, batch, seq, dtype))
    mask = masks(kind, batch, seq, dtype)
    padding = mask.get("src_key_padding_mask")
    if arch == "transformer":
        causal = torch.nn.Transformer.generate_square_subsequent_mask(seq - 1, dtype=dtype)
        kwargs = {"tgt_mask": causal, "tgt_is_causal": True} if kind != "none" else {}
        return model(
            x,
            x[:, :-1],
            src_key_padding_mask=padding,
            memory_key_padding_mask=padding,
            **kwargs,
        )
    return model(x[:, :-1], x, key_padding_mask=padding)


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
    model = build("transformer")
    keys = list(model.state_dict())
    fuse_wgrad(model)
    attns = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert len(attns) == 3 and all(type(m) is MultiheadAttention for m in attns)
    for m in attns:
        assert isinstance(m.out_proj, NonDynamicallyQuantizableLinear)
        assert isinstance(m.out_proj, fastaccum.nn.Linear)
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", MASKS)
def test_encoder_forward_is_torchs_bit_for_bit(kind, batch_first):
    """With a sink attached (the fused route), every mask configuration of an encoder
    layer gives torch's output exactly, and backward writes the accumulators instead of
    .grad."""
    model, plain = build(batch_first=batch_first), build(batch_first=batch_first)
    fuse_wgrad(model)
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    x = torch.randn(3, 7, EMBED)
    if not batch_first:
        x = x.transpose(0, 1)
    out = model(x, **masks(kind, 3, 7))
    assert torch.equal(out, plain(x, **masks(kind, 3, 7)))
    opt.backward(out.square().mean())
    opt.step()
    attn = model.self_attn
    for p in (attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight):
        assert p.grad is None and opt._accums[p].abs().sum() > 0
        # written by the fused projections (a folded .grad would pass the line above too)
        assert id(p) in opt._fused_seen


def attention_inputs(call, layout, gen):
    """(query, key, value) of one call kind: ``self`` (one tensor), ``cross`` (key is
    value, a memory of another length) or ``separate`` (three tensors), in ``layout``
    (``batch_first``, ``seq_first`` or ``unbatched``)."""

    def tensor(seq):
        shape = {"batch_first": (3, seq, EMBED), "seq_first": (seq, 3, EMBED)}
        return torch.randn(shape.get(layout, (seq, EMBED)), generator=gen)

    x = tensor(5)
    if call == "self":
        return x, x, x
    memory = tensor(7)
    return (x, memory, memory) if call == "cross" else (x, memory, tensor(7))


def attention_masks(batched, tgt, src, gen):
    """Keyword arguments of nn.MultiheadAttention for six mask configurations."""
    batch = 3 if batched else 1
    padding = torch.zeros((batch, src) if batched else (src,), dtype=torch.bool)
    padding[..., src // 2 :] = True
    per_head = torch.randn(batch * HEADS, tgt, src, generator=gen)
    blocked = torch.rand(tgt, src, generator=gen) > 0.7
    blocked[:, 0] = False  # every query sees the first key: no row is masked whole
    float_padding = padding.float().masked_fill(padding, -1e4)
    return [
        {},
        {"key_padding_mask": padding},
        {"attn_mask": torch.randn(tgt, src, generator=gen)},
        {"attn_mask": per_head, "key_padding_mask": float_padding},
        {"attn_mask": blocked, "key_padding_mask": padding},
        # is_causal is a hint that torch drops once a padding mask is merged in: the
        # (here non-causal) mask alone decides
        {"attn_mask": per_head[0], "key_padding_mask": float_padding, "is_causal": True},
    ]


@pytest.mark.parametrize("layout", ["batch_first", "seq_first", "unbatched"])
@pytest.mark.parametrize("weights", ["none", "averaged", "per_head"])
@pytest.mark.parametrize("call", ["self", "cross", "separate"])
def test_every_call_is_torchs_and_accumulates_the_float64_gradients(call, weights, layout):
    """Self-attention, cross-attention (key is value) and three separate inputs, with
    and without attention weights (averaged over heads or not), batch first, sequence
    first or unbatched, under six mask configurations: output and attention weights
    equal torch's bit for bit, and the accumulators hold the float64 gradients of all of
    them, no .grad made."""
    batched, batch_first = layout != "unbatched", layout != "seq_first"
    gen = torch.Generator().manual_seed(3)

    def make():
        torch.manual_seed(0)
        return torch.nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first)

    model, plain, ref = fuse_wgrad(make()), make(), make().double()
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 100, model=model)
    q, k, v = attention_inputs(call, layout, gen)
    seq_dim = 1 if layout == "batch_first" else 0
    tgt, src = q.shape[seq_dim], k.shape[seq_dim]
    options = {"need_weights": weights != "none", "average_attn_weights": weights == "averaged"}
    for mask in attention_masks(batched, tgt, src, gen):
        out, w = model(q, k, v, **options, **mask)
        plain_out, plain_w = plain(q, k, v, **options, **mask)
        assert torch.equal(out, plain_out)
        assert (w is None and plain_w is None) or torch.equal(w, plain_w)
        opt.backward(out.square().sum() + (0 if w is None else w.square().sum()))
        opt.step()
        mask64 = {
            n: m.double() if torch.is_tensor(m) and m.is_floating_point() else m
            for n, m in mask.items()
        }
        q64, k64, v64 = (t.double() for t in (q, k, v))
        k64 = q64 if k is q else k64
        v64 = k64 if v is k else v64
        out, w = ref(q64, k64, v64, **options, **mask64)
        (out.square().sum() + (0 if w is None else w.square().sum())).backward()
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        assert p.grad is None and id(p) in opt._fused_seen  # written by the fused GEMMs
        assert_close_rel(opt._accums[p], r.grad, 1e-5)


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_draws_the_same_random_numbers(need_weights):
    def make():
        torch.manual_seed(0)
        return torch.nn.MultiheadAttention(EMBED, HEADS, dropout=0.3, batch_first=True)

    model, plain = fuse_wgrad(make()), make()
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    assert model._wgrad_sink is opt  # the fused route
    x, memory = torch.randn(3, 7, EMBED), torch.randn(3, 4, EMBED)
    for args in [(x, x, x), (x, memory, memory)]:
        torch.manual_seed(5)
        out, w = model(*args, need_weights=need_weights)
        torch.manual_seed(5)
        ref_out, ref_w = plain(*args, need_weights=need_weights)
        assert torch.equal(out, ref_out)
        assert (w is None and ref_w is None) or torch.equal(w, ref_w)


def float64_large_batch(arch, data, k, kind):
    """The reference: the plain model in float64, SGD with momentum, one backward per
    window on the mean over every output position of the window."""
    ref = build(arch).double()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for window in split_windows(data, k):
        items = [run(arch, ref, x.double(), kind, torch.float64) for x, _ in window]
        total = sum(out.shape[0] * out.shape[1] for out in items)
        loss = 0
        for out, (_, y) in zip(items, window, strict=True):
            loss = loss + (out - y[:, : out.shape[1]].double()).square().mean(-1).sum()
        (loss / total).backward()
        opt.step()
        opt.zero_grad()
    return ref


def attention_projections(model):
    return [
        p
        for m in model.modules()
        if isinstance(m, torch.nn.MultiheadAttention)
        for p in (m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias)
    ]


@pytest.mark.parametrize("route", ["cpp", "python", "compiled"])
@pytest.mark.parametrize("kind", ["none", "causal_padding"])
@pytest.mark.parametrize("arch", ARCHS)
def test_training_matches_the_float64_large_batch(arch, kind, route):
    """Windows of uneven micro-batches (num_items) through both routes, and under
    torch.compile, train as one large batch in float64, for self-attention, the
    transformer's cross-attention and a cross-attention that returns its weights; no
    parameter is left holding a .grad, and the attention projections never had one (the
    fused set)."""
    if route != "python" and not _backend.has_extension():
        pytest.skip("C++ extension not built (FASTACCUM_NO_EXT=1)")
    k = 3
    data = batches(2 * k, seed=7)
    ref = float64_large_batch(arch, data, k, kind)
    model = fuse_wgrad(build(arch))
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapper = PythonRouteWrapper if route == "python" else fastaccum.AccumulatingOptimizer
    compiled = torch.compile(model, backend="aot_eager") if route == "compiled" else model
    opt = wrapper(inner, k, model=compiled)
    for x, y in data:
        out = run(arch, compiled, x, kind)
        loss = (out - y[:, : out.shape[1]]).square().mean()
        opt.backward(loss, num_items=out.shape[0] * out.shape[1])
        assert all(p.grad is None for p in model.parameters())
        opt.step()
    assert {id(p) for p in attention_projections(model)} <= opt._fused_seen
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_no_projection_weight_gradient_is_made(arch, fused):
    """The fused path allocates no [3E, E], [2E, E] or [E, E] tensor during backward;
    the unfused one does (which shows the check can fail)."""
    model = build(arch)
    if fused:
        fuse_wgrad(model)
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    x = torch.randn(2, 5, EMBED)
    opt.backward(run(arch, model, x).square().mean())  # first call creates the accumulators
    opt.step()
    loss = run(arch, model, x).square().mean()
    shapes = [shape for shape, _ in allocated_shapes(lambda: opt.backward(loss))]
    projections = {(3 * EMBED, EMBED), (2 * EMBED, EMBED), (EMBED, EMBED)}
    assert ([s for s in shapes if s in projections] == []) == fused


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


@pytest.mark.parametrize(
    "options",
    [{"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 24, "vdim": 40}],
    ids=["bias_kv", "zero_attn", "kdim_vdim"],
)
def test_layouts_it_does_not_fuse_run_torchs_forward(options):
    """Modules with bias_k/bias_v, add_zero_attn or separate q/k/v weights take torch's
    own forward, with torch's results and no fused projection in their graph; the same
    call on a plain module is fused (which shows the check can fail)."""

    def make(**kw):
        torch.manual_seed(0)
        return torch.nn.MultiheadAttention(EMBED, HEADS, batch_first=True, **kw)

    x = torch.randn(3, 5, EMBED)
    for kw, fused in [(options, False), ({}, True)]:
        model, plain = fuse_wgrad(make(**kw)), make(**kw)
        opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
        assert model.out_proj._wgrad_sink is opt  # the wrapper is attached in both cases
        memory = torch.randn(3, 7, kw.get("kdim", EMBED))
        value = torch.randn(3, 7, kw["vdim"]) if "vdim" in kw else memory
        out, weights = model(x, memory, value)
        ref_out, ref_weights = plain(x, memory, value)
        assert torch.equal(out, ref_out) and torch.equal(weights, ref_weights)
        assert _runs_a_fused_gemm(out) == fused


def bad_calls(x):
    """Calls torch rejects: (name, args, kwargs)."""
    memory = torch.randn(3, 7, EMBED)
    return [
        ("is_causal_without_mask", (x, x, x), {"need_weights": False, "is_causal": True}),
        ("padding_shape", (x, x, x), {"key_padding_mask": torch.zeros(3, 4, dtype=torch.bool)}),
        ("attn_mask_shape", (x, memory, memory), {"attn_mask": torch.zeros(5, 5)}),
        ("attn_mask_dims", (x, x, x), {"attn_mask": torch.zeros(1, 1, 5, 5)}),
        ("mask_dtype", (x, x, x), {"attn_mask": torch.zeros(5, 5, dtype=torch.int64)}),
        ("embed_dim", (x[..., :-1],) * 3, {}),
        ("key_value_shapes", (x, memory, memory[:, :-1]), {}),
        ("batch_sizes", (x, memory[:2], memory[:2]), {}),
        ("unbatched_key", (x, memory[0], memory[0]), {}),
    ]


@pytest.mark.parametrize("index", range(len(bad_calls(torch.zeros(3, 5, EMBED)))))
def test_input_torch_rejects_gets_torchs_error(index):
    """Each bad call raises torch's own exception, with torch's message, and leaves no
    gradient anywhere."""
    model, plain = fuse_wgrad(build()).self_attn, build().self_attn
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    assert model._wgrad_sink is opt
    x = torch.randn(3, 5, EMBED)
    _, args, kwargs = bad_calls(x)[index]
    with pytest.raises(Exception) as expected:
        plain(*args, **kwargs)
    with pytest.raises(expected.type, match=re.escape(str(expected.value))):
        model(*args, **kwargs)
    assert opt._accums == {} and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("arch", ["encoder", "weights"])
def test_autocast_bf16_matches_torch(arch):
    model, plain = fuse_wgrad(build(arch)), build(arch)
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    x = torch.randn(3, 7, EMBED)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(arch, model, x, "causal")
        ref = run(arch, plain, x, "causal")
    assert torch.equal(out, ref)
    opt.backward(out.float().square().mean())
    opt.step()
    assert all(p.grad is None for p in attention_projections(model))
    assert {id(p) for p in attention_projections(model)} <= opt._fused_seen
