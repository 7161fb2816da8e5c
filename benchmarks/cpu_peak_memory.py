"""Peak resident memory of one optimizer window on the CPU, per provider.

A parameter-heavy model (a stack of 2048x2048 Linear layers, 33.6M parameters: 134 MB per
fp32 copy) with tiny activations, so that gradients, accumulators and optimizer state set
the peak. Each provider runs in its own process: it builds the model, runs one warm-up
window (optimizer state, accumulators), then one measured window. Reported: the process's
peak resident set during the measured window minus its resident set before the model was
built (``fastaccum.workloads.peak_rss_bytes`` machinery; Linux only), in MiB and in units
of one fp32 set of gradients.

``native.foreach`` is the native loop with ``torch.optim.AdamW(..., foreach=True)``: the
implementation ``torch.optim`` picks by default on CUDA (on CPU it picks the per-tensor loop),
so its peak shows on this machine the full-size step temporaries a GPU user's native loop has.
``wrap.backward.torchstep`` is ``wrap`` with ``fused_update=False``: torch's own AdamW step
at the boundary instead of the fused update.

Run: python benchmarks/cpu_peak_memory.py
"""

from __future__ import annotations

import multiprocessing as mp
import sys

PROVIDERS = [
    "native",
    "native.foreach",
    "wrap.step",
    "wrap.backward",
    "wrap.backward.torchstep",
    "fused.AdamW.backward",
]
K, WIDTH, DEPTH, BATCH = 4, 2048, 8, 4


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _run(provider: str, queue: mp.Queue) -> None:
    import torch

    import fastaccum
    import fastaccum.optim
    from fastaccum.workloads import _pin_mmap_threshold

    _pin_mmap_threshold()
    torch.manual_seed(0)
    data = [torch.randn(BATCH, WIDTH) for _ in range(K)]
    base = _rss("VmRSS")
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)])
    params = list(model.parameters())

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return model(x).square().mean()

    if provider.startswith("native"):
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=provider == "native.foreach")

        def window() -> None:
            for x in data:
                (loss_of(x) / K).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()

    else:
        if provider.startswith("fused"):
            wrapped = fastaccum.optim.AdamW(params, lr=1e-4, accum_steps=K, max_grad_norm=1.0)
        else:
            wrapped = fastaccum.wrap(
                torch.optim.AdamW(params, lr=1e-4),
                K,
                max_grad_norm=1.0,
                fused_update=not provider.endswith("torchstep"),
            )

        def window() -> None:
            for x in data:
                if ".backward" in provider:
                    wrapped.backward(loss_of(x))
                else:
                    loss_of(x).backward()
                wrapped.step()
                wrapped.zero_grad()

    window()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    window()
    grad_set = sum(p.numel() * 4 for p in params)
    queue.put((_rss("VmHWM") - base, grad_set))


def main() -> int:
    ctx = mp.get_context("spawn")
    rows = []
    for provider in PROVIDERS:
        queue = ctx.Queue()
        proc = ctx.Process(target=_run, args=(provider, queue))
        proc.start()
        peak, grad_set = queue.get()
        proc.join()
        rows.append((provider, peak, grad_set))
    native = rows[0][1]
    print(f"{'provider':<22} {'peak MiB':>9} {'grad sets':>10} {'vs native (grad sets)':>22}")
    for provider, peak, grad_set in rows:
        print(
            f"{provider:<22} {peak / 2**20:>9.1f} {peak / grad_set:>10.2f} "
            f"{(peak - native) / grad_set:>+22.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
