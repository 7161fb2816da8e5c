"""The output of ``fastaccum bench``: the table, ``bench.json`` and the PNG plot."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from fastaccum.bench.runs import FP32_TOLERANCE, BenchConfig, RunResult

BASELINE = "native-accum"
"""The run that speed-ups are quoted against: native PyTorch doing the same accumulation."""


def run_record(result: RunResult, tokens_per_step: int, baseline_s: float | None) -> dict[str, Any]:
    """One run as a JSON-ready dict: times in ms, rates in tokens/s, memory in bytes."""
    s = result.seconds_per_step
    return {
        "name": result.name,
        "description": result.description,
        "status": result.status,
        "exact": result.exact,
        "ms_per_step": None if s is None else s * 1e3,
        "tokens_per_s": None if s is None else tokens_per_step / s,
        "speedup_vs_native_accum": None if s is None or baseline_s is None else baseline_s / s,
        "peak_memory_bytes": result.peak_bytes,
        "final_loss": result.losses[-1] if result.losses else None,
        "max_abs_param_deviation": result.max_abs_deviation,
        "step_ms": [t * 1e3 for t in result.step_seconds],
        "losses": result.losses,
        "noise_scale": result.noise_scale,
        "noise_scale_units": result.noise_scale_units,
        "noise_scale_windows": result.noise_scale_windows,
        "noise_scale_first_micro_batch": result.noise_scale_first_micro_batch,
        "critical_batch_hint": result.critical_batch_hint,
        "fused_update": result.fused_update,
    }


def build_report(
    config: BenchConfig,
    results: list[RunResult],
    *,
    tokens_per_step: int,
    parameters: int,
    device_name: str,
    memory_kind: str,
    data_name: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything ``bench.json`` holds: settings, environment, and one record per run.

    ``reference`` names the run deviations are measured against (the first that completed);
    ``fp32_check`` says whether every exact fastaccum run (all but the lossy activation
    compression) came within :data:`FP32_TOLERANCE` of it (None when the check does not
    apply: not fp32, or no reference).
    """
    import datetime

    import torch

    import fastaccum

    baseline = next((r for r in results if r.name == BASELINE and r.status == "ok"), None)
    baseline_s = baseline.seconds_per_step if baseline else None
    reference = next((r.name for r in results if r.status == "ok"), None)
    fastaccum_devs = [
        r.max_abs_deviation
        for r in results
        if r.name.startswith("fastaccum") and r.exact and r.max_abs_deviation is not None
    ]
    check = None
    if config.dtype == "fp32" and reference is not None and fastaccum_devs:
        check = all(d <= FP32_TOLERANCE for d in fastaccum_devs)
    return {
        "config": dataclasses.asdict(config),
        "data": data_name,
        "device": device_name,
        "torch": torch.__version__,
        "fastaccum": fastaccum.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "parameters": parameters,
        "tokens_per_step": tokens_per_step,
        "peak_memory": memory_kind,
        "reference": reference,
        "fp32_tolerance": FP32_TOLERANCE,
        "fp32_check": check,
        **(extra or {}),
        "runs": [run_record(r, tokens_per_step, baseline_s) for r in results],
    }


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def _noise_scale_line(report: dict[str, Any]) -> str | None:
    """The gradient noise scale each fastaccum run's ``opt.stats()`` ended with, and the
    first one's verdict on the window size; None when no run estimated it."""
    runs = [r for r in report["runs"] if r.get("noise_scale_windows")]
    if not runs:
        return None
    values = ", ".join(
        f"{r['name']} {_fmt(r['noise_scale'], '.3g', 'n/a')} ({r['noise_scale_windows']} windows)"
        for r in runs
    )
    hint = next((r["critical_batch_hint"] for r in runs if r["critical_batch_hint"]), None)
    line = f"gradient noise scale (opt.stats(), in {runs[0]['noise_scale_units']}): {values}."
    partial = [r["name"] for r in runs if r.get("noise_scale_first_micro_batch")]
    if partial and len(partial) < len(runs):
        line += (
            f" {' and '.join(partial)} estimate their fused layers from each window's first"
            " micro-batch only: the same unbiased estimate, noisier over few windows."
        )
    return line if hint is None else f"{line} {hint}."


def format_table(report: dict[str, Any]) -> str:
    """The table printed at the end of the bench, with a legend under it."""
    header = (
        f"{'run':<20} {'ms/step':>9} {'tokens/s':>10} {'vs native':>10} {'peak MiB':>9} "
        f"{'final loss':>11} {'max |dθ|':>10}"
    )
    lines = [header, "-" * len(header)]
    cap = report["config"]["memory_cap_gb"]
    cap_bytes = None if cap is None else cap * 2**30
    for r in report["runs"]:
        if r["status"] != "ok":
            lines.append(f"{r['name']:<20} {r['status'].upper():>9}")
            continue
        peak = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20
        over = cap_bytes is not None and peak is not None and r["peak_memory_bytes"] > cap_bytes
        speedup = _fmt(r["speedup_vs_native_accum"], ".2f")
        lines.append(
            f"{r['name']:<20} {_fmt(r['ms_per_step'], '.1f'):>9} "
            f"{_fmt(r['tokens_per_s'], ',.0f'):>10} {speedup + 'x':>10} "
            f"{_fmt(peak, '.1f') + ('*' if over else ''):>9} {_fmt(r['final_loss'], '.4f'):>11} "
            f"{_fmt(r['max_abs_param_deviation'], '.1e'):>10}"
        )
    c = report["config"]
    lines.append("")
    lines.append(
        f"{c['model']} byte-level GPT ({report['parameters']:,} parameters) on {report['data']}; "
        f"{c['steps']} AdamW steps of {c['accum_steps']} x {c['micro_batch']} sequences "
        f"({report['tokens_per_step']:,} tokens per step), {c['dtype']}, seed {c['seed']}, "
        f"{'torch.compile, ' if c.get('compile') else ''}{report['device']}."
    )
    order = report.get("order", "sequential")
    lines.append(
        f"ms/step: median over the steps after the first, runs timed {order}"
        f"{' (step by step, round-robin)' if order == 'interleaved' else ''}; "
        "vs native: speed-up over "
        f"native-accum; peak: {report['peak_memory']}; max |dθ|: largest parameter "
        f"difference from {report['reference'] or 'the reference (none completed)'}."
    )
    plan = report.get("memory_cap")
    if plan is not None:
        lines.append(
            f"memory cap {cap:g} GiB: fastaccum.plan_batch found at most "
            f"{plan['largest_micro_batch_that_fits']} sequences per micro-batch fit; the "
            f"micro-batch runs take the target batch of {plan['target_batch']} as "
            f"{plan['accum_steps']} x {plan['micro_batch']}."
        )
        if any(r["status"] == "oom" for r in report["runs"]):
            lines.append("OOM: ran out of memory under the cap.")
        if "cpu" in report["device"]:
            lines.append(
                "*: peak above the cap (the CPU cannot be capped; on a GPU with --memory-cap "
                "this run would not fit)."
            )
    check = report["fp32_check"]
    if c["dtype"] != "fp32":
        lines.append(
            f"no 1e-5 check under {c['dtype']}: the forward rounds differently for a micro-batch "
            "and for the large batch, so every run (native accumulation too) drifts further."
        )
    noise = _noise_scale_line(report)
    if noise:
        lines.append(noise)
    if check is not None:
        verdict = "PASS" if check else "FAIL"
        lines.append(
            f"fp32 check: every exact fastaccum run within {report['fp32_tolerance']:.0e} of "
            f"{report['reference']}: {verdict}."
        )
    return "\n".join(lines)


def write_json(report: dict[str, Any], out_dir: Path) -> Path:
    """Write ``bench.json`` into ``out_dir`` (created if missing); return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def write_plot(report: dict[str, Any], out_dir: Path) -> Path | None:
    """Write ``bench.png`` (loss curves, time per step and peak memory per run) into
    ``out_dir``; return its path, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = [r for r in report["runs"] if r["status"] == "ok"]
    fig, (ax_loss, ax_time, ax_mem) = plt.subplots(1, 3, figsize=(15, 4.5))
    styles = ["-", "--", ":", "-."]
    for i, r in enumerate(runs):
        # Runs that agree draw on top of each other; distinct dashes and widths keep each
        # one visible.
        ax_loss.plot(
            range(1, len(r["losses"]) + 1),
            r["losses"],
            label=r["name"],
            linestyle=styles[i % len(styles)],
            linewidth=3.0 - 0.5 * (i % 4),
        )
    ax_loss.set(
        xlabel="optimizer step",
        ylabel="training loss (nats/byte)",
        title="loss (same seeds and batches)",
    )
    ax_loss.legend(fontsize=8)
    names = [r["name"] for r in runs]
    colors = [f"C{i}" for i in range(len(runs))]
    ax_time.bar(names, [r["ms_per_step"] for r in runs], color=colors)
    ax_time.set(ylabel="ms per optimizer step (median)", title="time per step")
    peaks = [(r["peak_memory_bytes"] or 0) / 2**20 for r in runs]
    ax_mem.bar(names, peaks, color=colors)
    ax_mem.set(ylabel="MiB above the start of the run", title="peak memory")
    for ax in (ax_time, ax_mem):
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    c = report["config"]
    fig.suptitle(
        f"fastaccum bench: {c['model']} GPT, K={c['accum_steps']} x b={c['micro_batch']}, "
        f"{c['dtype']}, {report['device']}"
    )
    fig.tight_layout()
    path = out_dir / "bench.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
