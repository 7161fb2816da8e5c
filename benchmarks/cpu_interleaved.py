"""Interleaved CPU timing of the providers of a pytest-benchmark suite.

pytest-benchmark times one provider after another; on a shared CPU whose speed drifts over
minutes, that drift can exceed the differences between providers. This script runs the
providers round-robin (one call each per round, the order rotated every round), so drift
hits all of them alike, then reports the median and minimum time of each as a ratio to
native.

Each call is also measured in process CPU time (user + system, which includes the kernel's
work on page faults) and minor page faults, from ``getrusage``.

Suites:
- ``wrapper``: one optimizer window (test_wrapper_cpu.py). The report adds each provider's
  overhead beyond forward and backward as a ratio to native's, for two floors:
  ``fwd_bwd.fresh`` (forward and backward making fresh gradients: accumulation counts as
  overhead) and ``fwd_bwd`` (native's forward and backward with autograd's ``.grad +=``
  inside: native's accumulation counts as free). The overhead is paired: per round,
  ``t - t_floor`` of the same round, then the median over rounds, divided by native's,
  so that a slow round (the machine's speed drifts by more than the overheads) slows
  both terms of a difference alike. Wall time and CPU time give one ratio each.
- ``wgrad``: one micro-step with fused vs unfused weight gradients (test_wgrad_cpu.py).
- ``wgrad_compiled``: the same under ``torch.compile`` (inductor), with eager native (the
  baseline) and eager fused.
- ``embedding``: the same for a GPT-2-vocabulary embedding (test_wgrad_cpu.py).
- ``hf_gpt2``: the same for a Hugging Face GPT2LMHeadModel (transformers' Conv1D
  projections, tied head; test_wgrad_cpu.py; needs ``transformers``).
- ``encoder``: the same for torch's nn.TransformerEncoder (nn.MultiheadAttention).
- ``transformer``: the same for torch's nn.Transformer (decoder cross-attention too).
- ``replay``, ``replay_amsgrad``, ``replay_bf16``, ``replay_muon``: the optimizer's own
  work per window, on gradients computed once and handed over as autograd would
  (test_wrapper_cpu.py's ``test_optimizer_overhead*`` providers; ``native.fused`` is
  native with ``torch.optim.AdamW(fused=True)``). ``replay_amsgrad``:
  every AdamW with ``amsgrad=True``; ``replay_bf16``: bf16 parameters, with and without
  ``master_weights``; ``replay_muon``: Muon + AdamW as a list, the AdamW member torch's
  or fused. The fresh first gradient native receives is made outside the timed call.

Run: python benchmarks/cpu_interleaved.py SUITE [--rounds 30] [--providers a,b]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from tqdm import tqdm

Setup = Callable[[str], "Callable[[], object] | tuple[Callable[..., object], Callable | None]"]


def _suites() -> dict[str, tuple[list[str], Setup]]:
    import test_wgrad_cpu as wgrad
    import test_wrapper_cpu
    import torch

    def micro_step(setup: Callable[[str], tuple[object, Callable[[], object]]]):
        return lambda provider: setup(provider)[1]  # setup returns (model, micro_step)

    return {
        "wrapper": (test_wrapper_cpu.WINDOW_PROVIDERS, test_wrapper_cpu._setup),
        "wgrad": (wgrad.PROVIDERS, micro_step(wgrad._setup)),
        "wgrad_compiled": (
            ["native", "wrap.fused", *wgrad.COMPILED_PROVIDERS],
            micro_step(wgrad._setup),
        ),
        "embedding": (wgrad.PROVIDERS, micro_step(wgrad._embedding_setup)),
        "hf_gpt2": (wgrad.PROVIDERS, micro_step(wgrad._hf_gpt2_setup)),
        "encoder": (wgrad.PROVIDERS, micro_step(wgrad._encoder_setup)),
        "transformer": (wgrad.PROVIDERS, micro_step(wgrad._transformer_setup)),
        "replay": (test_wrapper_cpu.REPLAY_PROVIDERS, test_wrapper_cpu._replay_setup),
        "replay_bf16": (
            test_wrapper_cpu.MASTER_PROVIDERS,
            lambda p: test_wrapper_cpu._replay_setup(p, torch.bfloat16),
        ),
        "replay_amsgrad": (
            test_wrapper_cpu.REPLAY_PROVIDERS,
            lambda p: test_wrapper_cpu._replay_setup(p, amsgrad=True),
        ),
        "replay_muon": (test_wrapper_cpu.MUON_PROVIDERS, test_wrapper_cpu._replay_muon_setup),
    }


def _with_arguments(made) -> tuple[Callable[..., object], Callable[[], tuple]]:
    """A setup's call and a function giving its untimed arguments: setups return a call, or
    a ``(window, fresh)`` pair where ``fresh()`` returns ``(args, kwargs)`` or is None."""
    if not isinstance(made, tuple):
        return made, tuple
    window, fresh = made
    if fresh is None:
        return window, tuple
    return window, lambda: fresh()[0]


def paired_overhead(times: dict[str, list[float]], provider: str, floor: str) -> float:
    """Median over rounds of ``provider - floor``, over the same for native (NaN when
    native's overhead is not positive)."""
    mine = statistics.median(a - b for a, b in zip(times[provider], times[floor], strict=True))
    native = statistics.median(a - b for a, b in zip(times["native"], times[floor], strict=True))
    return mine / native if native > 0 else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=list(_suites()))
    parser.add_argument("--rounds", type=int, default=30, help="calls per provider")
    parser.add_argument(
        "--providers",
        help="comma-separated subset of the suite's providers (default: all); fewer "
        "providers make shorter rounds, so more of them fit in the same time",
    )
    args = parser.parse_args(argv)
    if args.rounds < 3:
        print(f"error: --rounds must be >= 3, got {args.rounds}", file=sys.stderr)
        return 2
    providers, setup = _suites()[args.suite]
    if args.providers:
        chosen = args.providers.split(",")
        unknown = [p for p in chosen if p not in providers]
        if unknown or "native" not in chosen:
            print(
                f"error: --providers must name providers of the {args.suite} suite, native "
                f"included; got {args.providers!r}; the suite has {', '.join(providers)}",
                file=sys.stderr,
            )
            return 2
        providers = [p for p in providers if p in chosen]
    calls = {p: _with_arguments(setup(p)) for p in providers}
    for call, fresh in calls.values():
        for _ in range(2):  # warm-up: optimizer state, accumulators, allocator, compilation
            call(*fresh())
    wall: dict[str, list[float]] = {p: [] for p in providers}
    cpu: dict[str, list[float]] = {p: [] for p in providers}
    faults: dict[str, int] = dict.fromkeys(providers, 0)
    for r in tqdm(range(args.rounds), desc=args.suite, file=sys.stderr):
        for p in providers[r % len(providers) :] + providers[: r % len(providers)]:
            call, fresh = calls[p]
            given = fresh()
            before = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            call(*given)
            wall[p].append(time.perf_counter() - t0)
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu[p].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
            faults[p] += after.ru_minflt - before.ru_minflt
    med = {p: statistics.median(t) for p, t in wall.items()}
    low = {p: min(t) for p, t in wall.items()}
    floors = [f for f in ("fwd_bwd.fresh", "fwd_bwd") if f in med]
    header = (
        f"{'provider':<28} {'median vs native':>17} {'min vs native':>14} "
        f"{'CPU ms':>8} {'faults':>8}"
    )
    print(header + "".join(f" {'overhead/native wall|cpu (' + f + ')':>38}" for f in floors))
    for p in providers:
        line = (
            f"{p:<28} {med['native'] / med[p]:>16.2f}x {low['native'] / low[p]:>13.2f}x "
            f"{statistics.median(cpu[p]) * 1e3:>8.1f} {faults[p] / args.rounds:>8.0f}"
        )
        for f in floors:
            ratios = [paired_overhead(t, p, f) for t in (wall, cpu)]
            line += f" {ratios[0]:>30.2f} | {ratios[1]:>5.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
