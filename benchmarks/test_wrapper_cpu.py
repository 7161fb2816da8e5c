"""CPU suite: one optimizer step of K=8 micro-batches on a small GPT-style model.

The model is ``fastaccum.workloads.ByteGPT`` at width 256, 4 heads, 4 blocks (3.3M
parameters), context 32, one sequence per micro-batch: its projections are ``nn.Linear``
layers, as GPT code is usually written, so ``fuse_wgrad`` reaches all of them.

Providers, on the same model, data and AdamW settings:

- ``fwd_bwd.fresh``:  K forward/backward passes that each make fresh gradients (``.grad``
                      is reset before every backward), with no accumulation, clip or
                      step: a candidate floor that would count accumulation as
                      overhead. On CPUs it comes out slower than native (a fresh
                      gradient per backward costs more than autograd's in-place
                      ``+=``), so the overhead figures use ``fwd_bwd``.
- ``fwd_bwd``:        the native loop's K forward/backward passes alone, autograd
                      accumulating into ``.grad``, with no clip and no step.
- ``native``:         ``(loss / K).backward()`` per micro-batch, then
                      ``clip_grad_norm_``, ``step``, ``zero_grad``: today's native loop.
- ``native.fused``:   the same with ``torch.optim.AdamW(fused=True)``, torch's fused
                      AdamW kernel.
- ``wrap.step``:      ``fastaccum.wrap(AdamW, K, max_grad_norm=1)`` with ``opt.step()``;
                      its window update runs in the fused kernel (``fused_update``).
- ``wrap.backward``:  the same with ``opt.backward(loss)``.
- ``*.torchstep``:    the same with ``fused_update=False``: torch's AdamW ``step()`` on
                      the accumulated window.
- ``fused.AdamW.*``:  ``fastaccum.optim.AdamW(..., accum_steps=K, max_grad_norm=1)``, with
                      ``opt.step()`` or ``opt.backward(loss)``: the fused boundary update.
- ``fused.AdamW.backward.wgrad``: the same with ``opt.backward`` after
                      ``fastaccum.fuse_wgrad(model)``: Linear weight gradients are
                      accumulated by the backward GEMM itself (beta=1).

The summary prints each provider's time per window as a ratio to native, its per-window
overhead beyond ``fwd_bwd`` as a ratio to native's overhead, and its peak resident memory
(``fastaccum.workloads.peak_rss_bytes``; the CPU allocator keeps no statistics).
"""

import pytest
import torch

import fastaccum
import fastaccum.optim
from fastaccum.workloads import ByteGPT, peak_rss_bytes

K, MICRO_BATCH, SEQ = 8, 1, 32


def _data():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (MICRO_BATCH, SEQ + 1), generator=gen) for _ in range(K)]


def _loss(model, batch):
    logits = model(batch[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def _setup(provider):
    torch.manual_seed(0)
    model = ByteGPT(dim=256, layers=4, ctx=SEQ)
    # native.fused: torch's fused AdamW kernel
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=provider == "native.fused" or None)
    data = _data()
    if provider == "fwd_bwd.fresh":

        def window():
            for batch in data:
                model.zero_grad(set_to_none=True)  # autograd hands over fresh gradients
                (_loss(model, batch) / K).backward()
            model.zero_grad(set_to_none=True)

    elif provider == "fwd_bwd":

        def window():
            for batch in data:
                (_loss(model, batch) / K).backward()  # autograd accumulates into .grad
            model.zero_grad(set_to_none=True)

    elif provider.startswith("native"):

        def window():
            for batch in data:
                (_loss(model, batch) / K).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            adamw.step()
            adamw.zero_grad()

    else:
        if provider.endswith(".wgrad"):
            fastaccum.fuse_wgrad(model)
        if provider.startswith("fused.AdamW"):
            opt = fastaccum.optim.AdamW(
                model.parameters(), lr=1e-3, accum_steps=K, model=model, max_grad_norm=1.0
            )
        else:
            fused_update = not provider.endswith(".torchstep")
            opt = fastaccum.wrap(
                adamw, K, model=model, max_grad_norm=1.0, fused_update=fused_update
            )
        use_backward = ".backward" in provider

        def window():
            for batch in data:
                if use_backward:
                    opt.backward(_loss(model, batch))
                else:
                    _loss(model, batch).backward()
                opt.step()
                opt.zero_grad()

    return window


WINDOW_PROVIDERS = [
    "fwd_bwd.fresh",
    "fwd_bwd",
    "native",
    "native.fused",
    "wrap.step",
    "wrap.backward",
    "wrap.backward.torchstep",
    "fused.AdamW.step",
    "fused.AdamW.backward",
    "fused.AdamW.backward.wgrad",
]


@pytest.mark.parametrize("provider", WINDOW_PROVIDERS)
def test_optimizer_window(benchmark, provider):
    torch.set_num_threads(torch.get_num_threads())
    window = _setup(provider)
    window()  # warm-up; creates optimizer state and accumulators
    benchmark.group = "window K=8 GPT 3.3M AdamW"
    benchmark.extra_info.update(provider=provider, baseline="fwd_bwd")
    benchmark.extra_info["peak_bytes"] = peak_rss_bytes(window)
    benchmark.pedantic(window, rounds=15, warmup_rounds=1)


# ------------------------------------------------------------------------------------------
# The optimizer-side work alone. End-to-end windows are dominated by forward/backward, so
# their differences are small next to run-to-run noise on a shared CPU. Here the K
# micro-batch gradients are computed once and handed over the way autograd hands them over:
# native gets the first micro-batch's gradient as .grad and adds the others into it
# (AccumulateGrad), fastaccum gets each as a fresh .grad. Then each does its per-micro-batch
# and per-window work (native: clip_grad_norm_, step, zero_grad).


MASTER_PROVIDERS = [
    "native",
    "wrap.step",
    "wrap.step.masters",
    "wrap.step.masters.torchstep",
    "fused.AdamW.step.masters",
]
"""Replayed bf16 providers: ``native`` is bf16 ``.grad`` accumulation and ``AdamW`` on the
bf16 parameters (what a bf16 model gets without master weights); ``wrap.step`` folds into
fp32 accumulators and runs torch's AdamW on the bf16 parameters; ``*.masters`` keep fp32
master weights (``master_weights=True``) and take the fused boundary update
(``.torchstep``: torch's AdamW on the masters, ``fused_update=False``)."""


def _native_replay(params, grads, optimizers):
    """``(window, fresh)`` of the native loop on replayed gradients: the first micro-batch's
    gradient handed over as ``.grad`` (a fresh tensor from ``fresh()``, made outside the
    timed call, as autograd hands it over without a copy), the others added into it, then
    one clip over all parameters and each optimizer's step."""

    def window(first):
        for p, g in zip(params, first, strict=True):
            p.grad = g
        for micro in grads[1:]:
            for p, g in zip(params, micro, strict=True):
                p.grad.add_(g)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad()

    def fresh():
        return ([g.clone() for g in grads[0]],), {}

    return window, fresh


def _fastaccum_replay(params, grads, opt):
    """``(window, None)``: each replayed micro-batch handed to ``opt.step()`` as ``.grad``."""

    def window():
        for micro in grads:
            for p, g in zip(params, micro, strict=True):
                p.grad = g
            opt.step()
            opt.zero_grad()

    return window, None


def _replay_setup(provider, dtype=torch.float32, amsgrad=False):
    """``(window, fresh)``: one window of replayed gradients for ``provider`` (every AdamW
    with ``amsgrad`` as given). ``fresh`` (or None) returns the arguments of the next call,
    made outside the timed region."""
    torch.manual_seed(0)
    model = ByteGPT(dim=256, layers=4, ctx=SEQ).to(dtype)
    params = list(model.parameters())
    grads = [[torch.randn_like(p) * 1e-2 for p in params] for _ in range(K)]
    if provider.startswith("native"):  # native.fused: torch's fused AdamW kernel
        fused = provider == "native.fused" or None
        adamw = torch.optim.AdamW(params, lr=1e-3, amsgrad=amsgrad, fused=fused)
        return _native_replay(params, grads, [adamw])
    masters = ".masters" in provider
    if provider.startswith("fused.AdamW.step"):
        opt = fastaccum.optim.AdamW(
            params,
            lr=1e-3,
            amsgrad=amsgrad,
            accum_steps=K,
            max_grad_norm=1.0,
            master_weights=masters,
        )
    else:
        adamw = torch.optim.AdamW(params, lr=1e-3, amsgrad=amsgrad)
        opt = fastaccum.wrap(
            adamw,
            K,
            max_grad_norm=1.0,
            master_weights=masters,
            fused_update=not provider.endswith(".torchstep"),
        )
    return _fastaccum_replay(params, grads, opt)


def _run_replay(benchmark, window, fresh, group, provider):
    args = fresh()[0] if fresh else ()
    window(*args)  # warm-up: creates optimizer state and accumulators
    benchmark.group = group
    benchmark.extra_info.update(provider=provider)
    if fresh:
        benchmark.pedantic(window, setup=fresh, rounds=15, warmup_rounds=1)
    else:
        benchmark.pedantic(window, rounds=15, warmup_rounds=1)


REPLAY_PROVIDERS = [
    "native",
    "native.fused",
    "wrap.step",
    "wrap.step.torchstep",
    "fused.AdamW.step",
]
"""Replayed fp32 providers; ``native.fused`` is the native loop with
``torch.optim.AdamW(fused=True)``; ``wrap.step.torchstep`` runs torch's AdamW step on the
accumulated window (``fused_update=False``)."""


@pytest.mark.parametrize("provider", REPLAY_PROVIDERS)
def test_optimizer_overhead(benchmark, provider):
    window, fresh = _replay_setup(provider)
    group = "optimizer work per window K=8, 3.3M params, AdamW (replayed grads)"
    _run_replay(benchmark, window, fresh, group, provider)


@pytest.mark.parametrize("provider", REPLAY_PROVIDERS)
def test_optimizer_overhead_amsgrad(benchmark, provider):
    window, fresh = _replay_setup(provider, amsgrad=True)
    group = "optimizer work per window K=8, 3.3M params, AdamW amsgrad (replayed grads)"
    _run_replay(benchmark, window, fresh, group, provider)


@pytest.mark.parametrize("provider", MASTER_PROVIDERS)
def test_optimizer_overhead_bf16(benchmark, provider):
    window, fresh = _replay_setup(provider, torch.bfloat16)
    group = "optimizer work per window K=8, 3.3M bf16 params, AdamW (replayed grads)"
    _run_replay(benchmark, window, fresh, group, provider)


MUON_PROVIDERS = ["native", "wrap.list", "wrap.list.fused"]
"""Replayed Muon + AdamW providers (Muon on the blocks' 2-D weights, AdamW on the
embeddings, norms and biases): ``native`` runs both optimizers after ``.grad``
accumulation and one ``clip_grad_norm_`` over all parameters; ``wrap.list`` is
``fastaccum.wrap([muon, adamw], K)``; ``wrap.list.fused`` has ``fastaccum.optim.AdamW``
as the second member."""


def _replay_muon_setup(provider):
    """``(window, fresh)`` as :func:`_replay_setup`, for Muon + AdamW."""
    if provider not in MUON_PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {MUON_PROVIDERS}")
    torch.manual_seed(0)
    model = ByteGPT(dim=256, layers=4, ctx=SEQ)
    named = list(model.named_parameters())
    matrices = [p for n, p in named if p.ndim == 2 and n.startswith("blocks.")]
    rest = [p for n, p in named if not (p.ndim == 2 and n.startswith("blocks."))]
    params = matrices + rest
    grads = [[torch.randn_like(p) * 1e-2 for p in params] for _ in range(K)]
    muon = torch.optim.Muon(matrices, lr=0.02)
    if provider == "wrap.list.fused":
        second = fastaccum.optim.AdamW(rest, lr=1e-3)
    else:
        second = torch.optim.AdamW(rest, lr=1e-3)
    if provider == "native":
        return _native_replay(params, grads, [muon, second])
    opt = fastaccum.wrap([muon, second], K, model=model, max_grad_norm=1.0)
    return _fastaccum_replay(params, grads, opt)


@pytest.mark.parametrize("provider", MUON_PROVIDERS)
def test_optimizer_overhead_muon(benchmark, provider):
    window, fresh = _replay_muon_setup(provider)
    group = "optimizer work per window K=8, 3.3M params, Muon + AdamW (replayed grads)"
    _run_replay(benchmark, window, fresh, group, provider)
