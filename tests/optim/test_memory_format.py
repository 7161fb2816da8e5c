"""fastaccum.wrap on channels_last models: accumulators take the parameters' memory
format, so folding a gradient copies nothing. References are plain torch on the
concatenated batch, in the same memory format."""

import pytest
import torch
from torch.profiler import profile

import fastaccum
import fastaccum.optim as fo
from tests.helpers import assert_close_rel, resume, split_windows

CL = torch.channels_last
K = 3


def conv_net(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, padding=1)
    )
    return model.to(dtype=dtype, memory_format=CL)


def image_batches(n: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Micro-batches of 1 to 4 images each, channels_last."""
    gen = torch.Generator().manual_seed(1)
    sizes = torch.randint(1, 5, (n,), generator=gen).tolist()
    return [torch.randn(s, 3, 9, 9, generator=gen).to(dtype=dtype, memory_format=CL) for s in sizes]


def image_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean over the micro-batch's images of a per-image loss."""
    return model(x).float().square().mean((1, 2, 3)).mean()


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2)


def large_batch(batches: list[torch.Tensor], make_opt=sgd) -> torch.nn.Module:
    model = conv_net()
    opt = make_opt(model.parameters())
    for window in split_windows(batches, K):
        image_loss(model, torch.cat(window)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
        opt.step()
        opt.zero_grad()
    return model


def micro_step(model, opt, x, mode):
    loss = image_loss(model, x)
    if mode == "backward":
        opt.backward(loss, num_items=len(x))
    else:
        loss.backward()
    stepped = opt.step(num_items=len(x))
    opt.zero_grad()
    return stepped


def wrapped(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return fastaccum.wrap(opt, K, model=model, max_grad_norm=0.3)


def fresh_wrapped():
    model = conv_net()
    return model, wrapped(model)


@pytest.mark.parametrize("mode", ["step", "backward"])
def test_channels_last_matches_large_batch_training(mode):
    batches = image_batches(2 * K)
    model = conv_net()
    opt = wrapped(model)
    for x in batches:
        micro_step(model, opt, x, mode)
    for p, q in zip(model.parameters(), large_batch(batches).parameters(), strict=True):
        assert p.is_contiguous(memory_format=CL) == q.is_contiguous(memory_format=CL)
        assert_close_rel(p, q, 1e-5)
    weights = [p for p in model.parameters() if p.dim() == 4]
    assert all(opt._accums[w].is_contiguous(memory_format=CL) for w in weights)
    assert all(not opt._accums[w].is_contiguous() for w in weights)


def test_folding_a_channels_last_gradient_copies_nothing():
    model = conv_net()
    opt = wrapped(model)
    x = image_batches(1)[0]
    micro_step(model, opt, x, "step")  # the accumulators exist from here on
    image_loss(model, x).backward()
    assert all(p.grad.is_contiguous(memory_format=CL) for p in model.parameters() if p.dim() == 4)
    with profile() as prof:
        opt.step(num_items=len(x))
    ops = {e.name for e in prof.events()}
    assert "fastaccum::accumulate_" in ops
    assert not ops & {"aten::clone", "aten::contiguous", "aten::copy_"}, ops


def test_memory_format_changed_mid_window_and_resume_stay_exact():
    batches = image_batches(2 * K)
    model = conv_net()
    opt = wrapped(model)
    for i, x in enumerate(batches):
        if i == 1:  # the parameters turn contiguous; the accumulators stay channels_last
            model.to(memory_format=torch.contiguous_format)
        if i == 4:  # save mid-window, resume into a fresh channels_last model
            model, opt = resume(model, opt, fresh_wrapped)
        micro_step(model, opt, x.contiguous() if 1 <= i < 4 else x, "step")
    for p, q in zip(model.parameters(), large_batch(batches).parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def test_bf16_channels_last_parameters_get_fp32_window_gradients():
    """bf16 parameters, fp32 accumulators, no masters: the gradient the optimizer sees is
    the item-weighted window mean of the very same bf16 micro-batch gradients, summed in
    fp32, in the parameter's memory format."""
    batches = image_batches(K, torch.bfloat16)
    ref = conv_net(torch.bfloat16)
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in ref.parameters()]
    for x in batches:
        ref.zero_grad()
        image_loss(ref, x).backward()
        for s, p in zip(sums, ref.parameters(), strict=True):
            s += p.grad.double() * len(x)
    items = sum(len(x) for x in batches)

    model = conv_net(torch.bfloat16)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    inner.register_step_pre_hook(
        lambda o, args, kwargs: seen.extend(p.grad.clone() for p in model.parameters())
    )
    opt = fastaccum.wrap(inner, K, model=model)
    assert [micro_step(model, opt, x, "step") for x in batches] == [False, False, True]
    for g, s, p in zip(seen, sums, model.parameters(), strict=True):
        assert g.dtype == torch.bfloat16
        assert g.is_contiguous(memory_format=CL) == p.is_contiguous(memory_format=CL)
        assert_close_rel(g, s / items, 1e-2)


# --------------------------------------------------------------------------- fused classes


def fused(model, kind: str = "SGD"):
    """fastaccum's fused SGD (momentum) or AdamW, configured as sgd()/adamw() above."""
    options = {"momentum": 0.9} if kind == "SGD" else {}
    lr = 0.1 if kind == "SGD" else 1e-2
    return getattr(fo, kind)(
        model.parameters(), lr=lr, accum_steps=K, model=model, max_grad_norm=0.3, **options
    )


@pytest.mark.parametrize("mode", ["step", "backward"])
@pytest.mark.parametrize("kind", ["SGD", "AdamW"])
def test_fused_classes_step_channels_last_parameters_in_place(kind, mode):
    """The fused window step takes channels_last parameters, accumulators and state as the
    same memory (no copy at the boundary) and trains as the large batch."""
    batches = image_batches(3 * K)
    model = conv_net()
    opt = fused(model, kind)
    for i, x in enumerate(batches):
        if i == 2 * K - 1:  # a boundary with state in place: profile its step()
            loss = image_loss(model, x)
            opt.backward(loss, num_items=len(x)) if mode == "backward" else loss.backward()
            with profile(record_shapes=True) as prof:
                assert opt.step(num_items=len(x))
            assert any("window_step_" in e.name for e in prof.events())
            copies = [  # 0-d copies (the window norm, step counts) are not tensors' data
                (e.name, e.input_shapes)
                for e in prof.events()
                if e.name in ("aten::clone", "aten::contiguous", "aten::copy_")
                and any(len(shape) > 0 for shape in e.input_shapes)
            ]
            assert not copies, copies
        else:
            micro_step(model, opt, x, mode)
    want = large_batch(batches, sgd if kind == "SGD" else adamw)
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert p.is_contiguous(memory_format=CL) == q.is_contiguous(memory_format=CL)
        assert_close_rel(p, q, 1e-5)
    for p in model.parameters():
        for value in opt.state[p].values():
            if value.dim() == 4:
                assert value.is_contiguous(memory_format=CL) and not value.is_contiguous()


@pytest.mark.parametrize("kind", ["SGD", "AdamW"])
def test_fused_classes_follow_a_format_change_and_resume(kind):
    """The model turns contiguous mid-window (accumulators and state are re-laid once, at
    the boundary), then resumes mid-window into a fresh channels_last model: exact."""
    batches = image_batches(3 * K)
    make = sgd if kind == "SGD" else adamw

    def build():
        model = conv_net()
        return model, fused(model, kind)

    model, opt = build()
    for i, x in enumerate(batches):
        if i == K + 1:
            model.to(memory_format=torch.contiguous_format)
        if i == 2 * K + 1:
            model, opt = resume(model, opt, build)
        micro_step(model, opt, x.contiguous() if K + 1 <= i < 2 * K + 1 else x, "step")
    for p, q in zip(model.parameters(), large_batch(batches, make).parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)
