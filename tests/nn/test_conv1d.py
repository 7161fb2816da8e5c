"""fuse_wgrad on Hugging Face ``transformers``' Conv1D (GPT-2's projections, weight stored
[in, out]): what only Conv1D needs. The layer-level tests (gradients, both routes,
float64 large batch, no dW allocated, autocast, checkpointing, torch.compile) run for
Conv1D in tests/nn/test_linear.py (``kind="conv1d"``)."""

import copy
import io

import pytest
import torch

import fastaccum
from fastaccum.nn import fuse_wgrad
from tests.helpers import assert_close_rel
from tests.nn.test_linear import mlp

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def test_fuse_wgrad_switches_conv1d_keeping_class_keys_and_results():
    model = tiny_gpt2()
    plain = copy.deepcopy(model)
    fuse_wgrad(model)
    convs = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert len(convs) == 8  # c_attn, c_proj, c_fc, c_proj per block
    assert all(type(m).__module__ == "fastaccum.nn.conv1d" for m in convs)
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert repr(model) == repr(plain)
    ids = torch.randint(0, 64, (3, 16))
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    assert all(m._wgrad_sink is opt for m in convs)
    for m in (model, plain):
        m.eval()
    assert torch.equal(model(ids).logits, plain(ids).logits)  # sink attached, same forward


def test_pickled_and_copied_models_keep_the_fused_class():
    model = fuse_wgrad(mlp(kind="conv1d"))
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    buf = io.BytesIO()
    torch.save(model, buf)  # the sink link is left out of the pickle
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (loaded, copy.deepcopy(model)):
        assert type(other[0]) is type(model[0]) and other[0]._wgrad_sink is None
        assert torch.equal(other[0].weight, model[0].weight)
    # the loaded model fuses under a wrapper of its own
    opt = fastaccum.wrap(torch.optim.SGD(loaded.parameters(), lr=0.1), 2, model=loaded)
    x = torch.randn(3, 4, 13)
    opt.backward(loaded(x).square().mean())
    assert loaded[0].weight.grad is None
    assert opt._accums[loaded[0].weight].abs().sum() > 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gpt2_fused_trains_as_the_float64_large_batch(checkpointing):
    """A whole Hugging Face GPT-2 (Conv1D projections, embeddings, tied LM head) fused:
    no parameter ever holds a .grad, and two windows with uneven token counts give one
    large batch's SGD update, computed in float64; also with transformers' own gradient
    checkpointing on, which recomputes each block during backward."""
    k = 3
    gen = torch.Generator().manual_seed(5)
    windows = [
        [torch.randint(0, 64, (2, int(n)), generator=gen) for n in torch.randint(4, 17, (k,))]
        for _ in range(2)
    ]
    model = tiny_gpt2()
    if checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
        model.train()
    fuse_wgrad(model)
    ref = tiny_gpt2().double()
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.5), k, model=model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    mlp_calls = []
    model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda *_: mlp_calls.append(1))
    for window in windows:
        total = sum(ids.shape[0] * (ids.shape[1] - 1) for ids in window)
        for ids in window:
            items = ids.shape[0] * (ids.shape[1] - 1)
            opt.backward(model(ids, labels=ids).loss, num_items=items)
            assert all(p.grad is None for p in model.parameters())
            opt.step()
            (ref(ids, labels=ids).loss * items / total).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    # checkpointing recomputes each block's forward once during its backward
    assert len(mlp_calls) == (2 if checkpointing else 1) * 2 * k
    fused = [name for name, p in model.named_parameters() if id(p) in opt._fused_seen]
    assert len(fused) == sum(1 for _ in model.parameters()) - 10  # all but LayerNorms
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)
