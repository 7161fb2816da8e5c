"""CPU suite: one micro-step (forward + backward + accumulation) on GPT-2-small-shaped
blocks (2 blocks, 14.2M parameters; micro-batch 2 x 64 tokens), three ways:

- ``native``:        ``loss.backward()``; autograd makes each dW and adds it into ``.grad``.
- ``wrap.unfused``:  ``fastaccum.wrap`` + ``opt.backward``: dW made, then folded into the
                     fp32 accumulator by ``accumulate_``.
- ``wrap.fused``:    the same after ``fastaccum.fuse_wgrad(model)``: the weight-gradient
                     GEMM adds into the accumulator (beta = 1); no dW is made.

and the same three under ``torch.compile`` (inductor; ``.compiled``), where the fused
layers run eagerly between compiled graphs.

Besides time, each benchmark records the bytes that ops allocate during one micro-step
(``fastaccum.workloads.allocated_shapes``) and the peak resident memory.
"""

import pytest
import torch

import fastaccum
from fastaccum.workloads import GPT2Blocks, allocated_shapes, peak_rss_bytes

K_NEVER = 10**6  # no window boundary inside the timed micro-steps


def _provider(model, loss, provider):
    """(model, micro_step) for ``provider``: native ``loss(model).backward()``, or the
    wrapper's ``opt.backward(loss(model))`` without (``wrap.unfused``) or after
    ``fuse_wgrad`` (``wrap.fused``); the window never closes, so every call is one
    micro-step. A ``.compiled`` suffix runs ``torch.compile(model)`` (inductor) instead
    of ``model``."""
    kind, compiled = provider.removesuffix(".compiled"), provider.endswith(".compiled")
    if kind == "wrap.fused":
        fastaccum.fuse_wgrad(model)
    run = torch.compile(model) if compiled else model
    if kind == "native":

        def micro_step():
            loss(run).backward()

        return model, micro_step
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.0), K_NEVER, model=run)

    def micro_step():
        opt.backward(loss(run))
        opt.step()

    return model, micro_step


def _setup(provider):
    torch.manual_seed(0)
    model = GPT2Blocks(blocks=2)
    x = torch.randn(2, 64, 768)
    return _provider(model, lambda m: m(x).square().mean(), provider)


PROVIDERS = ["native", "wrap.unfused", "wrap.fused"]
COMPILED_PROVIDERS = [f"{p}.compiled" for p in PROVIDERS]


@pytest.mark.parametrize("provider", PROVIDERS + COMPILED_PROVIDERS)
def test_micro_step(benchmark, provider):
    model, micro_step = _setup(provider)
    micro_step()  # warm-up: .grad / accumulators exist from here on
    allocated = sum(nbytes for _, nbytes in allocated_shapes(micro_step))
    weight_bytes = sum(
        m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    benchmark.group = "micro-step GPT-2 blocks x2 (fwd+bwd+accumulate)"
    if provider.endswith(".compiled"):
        benchmark.group += ", torch.compile (inductor)"
    benchmark.extra_info.update(
        provider=provider,
        allocated_bytes=allocated,
        linear_weight_bytes=weight_bytes,
        peak_bytes=peak_rss_bytes(micro_step),
    )
    benchmark.pedantic(micro_step, rounds=9, warmup_rounds=1)
    if provider.startswith("wrap.fused"):
        assert all(m.weight.grad is None for m in model.modules() if isinstance(m, torch.nn.Linear))


# ------------------------------------------------------------------------------------------
# Embeddings: a GPT-2 vocabulary (50257 x 768, 147 MiB in fp32) looked up by 2 x 64 tokens.
# Native backward makes a dense [vocab, dim] dW per micro-step (zero-filled, rows added)
# and adds it into .grad; fused, only the 128 looked-up rows are added into the
# accumulator.

VOCAB, EMB_DIM = 50257, 768


def _embedding_setup(provider):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, EMB_DIM))
    idx = torch.randint(0, VOCAB, (2, 64))
    return _provider(model, lambda m: m(idx).square().mean(), provider)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_embedding_micro_step(benchmark, provider):
    model, micro_step = _embedding_setup(provider)
    micro_step()  # warm-up: .grad / accumulators exist from here on
    shapes = allocated_shapes(micro_step)
    allocated = sum(nbytes for _, nbytes in shapes)
    benchmark.group = "micro-step Embedding 50257x768, 2x64 tokens (fwd+bwd+accumulate)"
    benchmark.extra_info.update(provider=provider, allocated_bytes=allocated)
    benchmark.pedantic(micro_step, rounds=9, warmup_rounds=1)
    if provider == "wrap.fused":
        assert model[0].weight.grad is None
        assert (VOCAB, EMB_DIM) not in [shape for shape, _ in shapes]  # no dense dW


# ------------------------------------------------------------------------------------------
# A Hugging Face GPT-2 (transformers' GPT2LMHeadModel at GPT-2-small widths, 2 layers, the
# full 50257-token vocabulary; micro-batch 2 x 64 tokens, LM loss). Its projections are
# transformers' Conv1D (weight stored [in, out]), its LM head is tied to the token
# embedding. Fused, every weight gradient (Conv1D, embeddings, head) goes into the
# accumulators; unfused and native, each is a full dW per micro-step.


def _hf_gpt2_setup(provider):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, config.vocab_size, (2, 64))
    return _provider(model, lambda m: m(ids, labels=ids).loss, provider)


def _whole_model_micro_step(benchmark, group, setup, provider):
    """Benchmark one micro-step of a whole model: time, bytes allocated, peak RSS; fused,
    no parameter may hold a .grad afterwards."""
    model, micro_step = setup(provider)
    micro_step()  # warm-up: .grad / accumulators exist from here on
    allocated = sum(nbytes for _, nbytes in allocated_shapes(micro_step))
    benchmark.group = group
    benchmark.extra_info.update(
        provider=provider,
        allocated_bytes=allocated,
        weight_bytes=sum(p.numel() * 4 for p in model.parameters() if p.dim() == 2),
        peak_bytes=peak_rss_bytes(micro_step),
    )
    benchmark.pedantic(micro_step, rounds=5, warmup_rounds=1)
    if provider == "wrap.fused":
        assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("provider", PROVIDERS)
def test_hf_gpt2_micro_step(benchmark, provider):
    pytest.importorskip("transformers")
    group = "micro-step HF GPT2LMHeadModel 2 layers, vocab 50257, 2x64 tokens"
    _whole_model_micro_step(benchmark, group, _hf_gpt2_setup, provider)


# ------------------------------------------------------------------------------------------
# torch's own transformer: nn.TransformerEncoder, 2 layers at GPT-2-small widths (768
# wide, 12 heads, 3072 feed-forward), causal mask, micro-batch 2 x 64 tokens. Its
# attention projections live in nn.MultiheadAttention (applied with F.linear inside
# F.multi_head_attention_forward); fused, fastaccum.nn.MultiheadAttention routes them.


def _encoder_setup(provider):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    x = torch.randn(2, 64, 768)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(64)
    return _provider(model, lambda m: m(x, mask=mask, is_causal=True).square().mean(), provider)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_encoder_micro_step(benchmark, provider):
    group = "micro-step nn.TransformerEncoder 2 x 768, causal, 2x64 tokens"
    _whole_model_micro_step(benchmark, group, _encoder_setup, provider)


# ------------------------------------------------------------------------------------------
# torch's encoder-decoder: nn.Transformer with 1 encoder and 1 decoder layer at the same
# widths, source and target 2 x 64 tokens, causal target mask. The decoder's
# cross-attention projects the target with the q rows of its packed input projection and
# the encoder output with the kv rows; fused, each adds into its rows of the accumulator.


def _transformer_setup(provider):
    torch.manual_seed(0)
    model = torch.nn.Transformer(768, 12, 1, 1, 3072, dropout=0.0, batch_first=True)
    src, tgt = torch.randn(2, 64, 768), torch.randn(2, 64, 768)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(64)

    def loss(m):
        return m(src, tgt, tgt_mask=mask, tgt_is_causal=True).square().mean()

    return _provider(model, loss, provider)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_transformer_micro_step(benchmark, provider):
    group = "micro-step nn.Transformer 1+1 x 768, causal target, 2x64 tokens"
    _whole_model_micro_step(benchmark, group, _transformer_setup, provider)
