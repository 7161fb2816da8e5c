"""CPU suite: one optimizer step of K=8 micro-batches on a small GPT-style model.

Providers, on the same model, data and AdamW settings:

- ``fwd_bwd``:        the K forward/backward passes alone (no accumulation, no step);
                      the part every provider pays.
- ``native``:         ``(loss / K).backward()`` per micro-batch, then
                      ``clip_grad_norm_``, ``step``, ``zero_grad``: today's native loop.
- ``wrap.step``:      ``fastaccum.wrap(AdamW, K, max_grad_norm=1)`` with ``opt.step()``.
- ``wrap.backward``:  the same with ``opt.backward(loss)``.

The summary prints each provider's time per window as a ratio to native, its per-window
overhead beyond ``fwd_bwd`` as a ratio to native's overhead, and its peak resident memory
(``fastaccum.workloads.peak_rss_bytes``; the CPU allocator keeps no statistics).
"""

import pytest
import torch

import fastaccum
from fastaccum.workloads import TinyGPT, peak_rss_bytes

K, MICRO_BATCH, SEQ = 8, 4, 64


def _data():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (MICRO_BATCH, SEQ + 1), generator=gen) for _ in range(K)]


def _loss(model, batch):
    logits = model(batch[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def _setup(provider):
    torch.manual_seed(0)
    model = TinyGPT()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = _data()
    if provider == "fwd_bwd":

        def window():
            for batch in data:
                _loss(model, batch).backward()
                model.zero_grad(set_to_none=True)

    elif provider == "native":

        def window():
            for batch in data:
                (_loss(model, batch) / K).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            adamw.step()
            adamw.zero_grad()

    else:
        opt = fastaccum.wrap(adamw, K, model=model, max_grad_norm=1.0)
        use_backward = provider == "wrap.backward"

        def window():
            for batch in data:
                if use_backward:
                    opt.backward(_loss(model, batch))
                else:
                    _loss(model, batch).backward()
                opt.step()
                opt.zero_grad()

    return window


@pytest.mark.parametrize("provider", ["fwd_bwd", "native", "wrap.step", "wrap.backward"])
def test_optimizer_window(benchmark, provider):
    torch.set_num_threads(torch.get_num_threads())
    window = _setup(provider)
    window()  # warm-up; creates optimizer state and accumulators
    benchmark.group = "window K=8 TinyGPT AdamW"
    benchmark.extra_info.update(provider=provider, baseline="fwd_bwd")
    benchmark.extra_info["peak_bytes"] = peak_rss_bytes(window)
    benchmark.pedantic(window, rounds=5, warmup_rounds=1)
