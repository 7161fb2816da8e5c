"""GPU script: how close ``fastaccum.plan_batch`` gets to the largest micro-batch that fits.

On a GPT-style model with AdamW through ``fastaccum.wrap``:

1. **Exhaustive search** (the reference): real windows (two micro-batches and the boundary
   step) at micro-batch 1, 2, 3, ... until one exceeds the usable memory (budget x (1 -
   headroom), by ``max_memory_allocated``) or runs out of memory.
2. ``plan_batch(..., memory_budget=budget)``: prediction from two probes, then verified.
3. ``plan_batch`` without a budget, under a hard cap of the same size set with
   ``torch.cuda.set_per_process_memory_fraction``: the search by real steps, recovering
   from the out-of-memory errors the cap causes.

For each plan: its largest micro-batch as a fraction of the exhaustive one (the bar is
>= 90%), and then a real run of a few windows at the planned micro-batch, which must not
run out of memory. Rows go to benchmarks/results/plan_gpu.csv.

``--device cpu --smoke`` checks the script on the CPU with a tiny model (budget mode only;
no CSV).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from results_csv import ROOT, device_error, environment, record_rows

import fastaccum
from fastaccum.memory.peak import peak_bytes, tensor_bytes
from fastaccum.workloads import ByteGPT

DEFAULT_CSV = ROOT / "benchmarks" / "results" / "plan_gpu.csv"
MODELS = {  # name -> ByteGPT(vocab, dim, heads, layers, ctx)
    "small": (256, 512, 8, 8, 256),
    "tiny": (256, 64, 4, 2, 32),
}


def _setup(spec: tuple, device: torch.device):
    torch.manual_seed(0)
    model = ByteGPT(*spec).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx = spec[-1]

    def make_batch(n: int) -> torch.Tensor:
        return torch.randint(0, spec[0], (n, ctx + 1), device=device)

    def loss_fn(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = m(batch[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    return model, opt, make_batch, loss_fn


def _window_peak(model, opt, make_batch, loss_fn, b: int, device) -> int | None:
    """Absolute peak bytes of one window at micro-batch b (None: out of memory)."""
    wrapped = fastaccum.wrap(opt, 2)

    def window() -> None:
        for _ in range(2):
            loss_fn(model, make_batch(b)).backward()
            wrapped.step()
            wrapped.zero_grad()

    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
    else:  # the tensors already allocated: parameters and optimizer state
        state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        before = tensor_bytes([*model.parameters(), *state])
    try:
        peak, _ = peak_bytes(window, device)
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None
    return before + peak


def exhaustive_max(spec, device, usable: int, limit: int) -> int:
    """The largest micro-batch (<= limit) whose window stays within ``usable`` bytes."""
    model, opt, make_batch, loss_fn = _setup(spec, device)
    best = 0
    for b in range(1, limit + 1):
        peak = _window_peak(model, opt, make_batch, loss_fn, b, device)
        if peak is None or peak > usable:
            break
        best = b
    return best


def run_planned(spec, device, micro: int, windows: int = 3) -> bool:
    """True when ``windows`` real windows at micro-batch ``micro`` run without OOM."""
    model, opt, make_batch, loss_fn = _setup(spec, device)
    wrapped = fastaccum.wrap(opt, 4)
    try:
        for _ in range(4 * windows):
            loss_fn(model, make_batch(micro)).backward()
            wrapped.step()
            wrapped.zero_grad()
    except torch.OutOfMemoryError:
        return False
    return True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--budget-gib", type=float, default=4.0, help="memory budget, GiB")
    parser.add_argument("--headroom", type=float, default=0.1)
    parser.add_argument("--target", type=int, default=1024, help="target batch (samples)")
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--smoke", action="store_true", help="tiny model, no CSV")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.budget_gib, args.target = "tiny", 0.006, 24
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    error = device_error(device, args.smoke, "gpu_plan.py")
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    spec = MODELS[args.model]
    budget = int(args.budget_gib * 2**30)
    usable = int(budget * (1 - args.headroom))
    reference = exhaustive_max(spec, device, usable, args.target)
    print(f"exhaustive search: largest micro-batch within {usable / 2**30:.2f} GiB: {reference}")
    results = {}
    model, opt, make_batch, loss_fn = _setup(spec, device)
    plan = fastaccum.plan_batch(
        model, make_batch, args.target, optimizer=opt, loss_fn=loss_fn,
        memory_budget=budget, headroom=args.headroom,
    )  # fmt: skip
    print(plan)
    results["plan.budget"] = plan
    if device.type == "cuda":
        del model, opt
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
        try:
            model, opt, make_batch, loss_fn = _setup(spec, device)
            plan = fastaccum.plan_batch(
                model, make_batch, args.target, optimizer=opt, loss_fn=loss_fn,
                headroom=args.headroom,
            )  # fmt: skip
            print(plan)
            results["plan.search"] = plan
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    rows = []
    env = environment(device)
    for name, plan in results.items():
        ratio = plan.max_micro_batch_size / reference if reference else float("nan")
        ok = run_planned(spec, device, plan.micro_batch_size)
        print(
            f"{name}: largest {plan.max_micro_batch_size} = {ratio:.0%} of exhaustive "
            f"{reference}; micro-batch {plan.micro_batch_size} x {plan.accum_steps}; "
            f"real run {'ok' if ok else 'OUT OF MEMORY'}"
        )
        common = {"op": f"plan_batch {args.model}", "provider": name, "size": args.target}
        rows += [
            {**common, "metric": "max_micro_batch_vs_exhaustive", "unit": "ratio", "p50": ratio},
            {**common, "metric": "micro_batch", "unit": "samples", "p50": plan.micro_batch_size},
            {**common, "metric": "exhaustive_max", "unit": "samples", "p50": reference},
            {**common, "metric": "planned_run_ok", "unit": "bool", "p50": int(ok)},
        ]
    record_rows(device, args.smoke, args.csv, [{**row, "dtype": "fp32", **env} for row in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
