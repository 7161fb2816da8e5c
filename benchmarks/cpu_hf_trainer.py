"""The Hugging Face Trainer against FastaccumTrainer on the CPU, in one run.

Providers (each trains the same model from the same weights on the same batches):
- ``trainer``: ``transformers.Trainer`` with ``gradient_accumulation_steps=K``;
- ``fastaccum``: ``FastaccumTrainer`` with the same arguments;
- ``fastaccum.fused``: the same with ``fuse_wgrad=True``.

The workload is a GPT2LMHeadModel at GPT-2-small widths (``--layers`` blocks, full
vocabulary, tied head), micro-batches of ``--micro-batch`` sequences of ``--seq`` tokens
whose labelled lengths differ, K = ``--accum-steps``, Trainer's default AdamW
(``optim="adamw_torch_fused"`` in transformers 5: torch's fused AdamW, which every provider
runs), clipping at 1.0. Timing: every round runs each provider's ``train()`` for ``--steps`` optimizer steps,
in an order rotated every round so the machine's drift hits all alike; the time of each
optimizer step is taken from Trainer callbacks (the first step of each run, which builds
the optimizer state, is left out) and the median over all rounds is quoted as a ratio to
``trainer``. Memory: one more run of 2 steps per provider under a tensor counter
(``fastaccum.memory.peak.LiveTensorBytes``) gives the peak bytes of tensors created
during training (the optimizer state included, the model's weights not). The largest
relative parameter difference from ``trainer`` after the timed steps is printed too.

Run: python benchmarks/cpu_hf_trainer.py [--rounds 3] [--steps 4] [--out FILE]

Under DDP (Trainer's own, on gloo processes; rank 0 reports, its peak is per process):
    python -m torch.distributed.run --nproc_per_node 2 --standalone \
        benchmarks/cpu_hf_trainer.py --threads 1 [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from fastaccum.integrations import FastaccumTrainer
from fastaccum.memory.peak import LiveTensorBytes

PROVIDERS = {
    "trainer": (Trainer, {}),
    "fastaccum": (FastaccumTrainer, {}),
    "fastaccum.fused": (FastaccumTrainer, {"fuse_wgrad": True}),
}


class StepTimes(TrainerCallback):
    """Wall seconds of each optimizer step (from its first micro-batch to its end)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def dataset(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    lengths = torch.randint(seq // 4, seq + 1, (n,), generator=g)
    rows = []
    for i in range(n):
        labels = ids[i].clone()
        labels[lengths[i] :] = -100
        rows.append({"input_ids": ids[i], "labels": labels})
    return rows


def run(name: str, base: GPT2LMHeadModel, rows, opts, steps: int, out: str, callbacks=()):
    cls, extra = PROVIDERS[name]
    model = copy.deepcopy(base)
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=opts.micro_batch,
        gradient_accumulation_steps=opts.accum_steps,
        max_steps=steps,
        learning_rate=3e-4,
        weight_decay=0.1,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = cls(model=model, args=args, train_dataset=rows, callbacks=list(callbacks), **extra)
    trainer.train()
    return model, [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the comparison; return per provider its speed and peak ratios to ``trainer``
    and its first-window grad-norm difference (also printed as a Markdown report)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (>= 2)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--accum-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, default=None, help="append the report here")
    opts = parser.parse_args(argv)
    if opts.steps < 2:
        parser.error("--steps must be at least 2 (the first step of each run is left out)")
    if opts.threads:
        torch.set_num_threads(opts.threads)

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=opts.layers,
        n_positions=opts.seq,
        vocab_size=opts.vocab,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    base = GPT2LMHeadModel(config)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    main_rank = int(os.environ.get("RANK", "0")) == 0
    n_rows = opts.steps * opts.micro_batch * opts.accum_steps * world
    rows = dataset(n_rows, opts.seq, config.vocab_size)
    names = list(PROVIDERS)
    times: dict[str, list[float]] = {name: [] for name in names}
    finals: dict[str, tuple[GPT2LMHeadModel, list[float]]] = {}
    with tempfile.TemporaryDirectory() as out:
        for r in range(opts.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                clock = StepTimes()
                finals[name] = run(name, base, rows, opts, opts.steps, out, [clock])
                times[name].extend(clock.times[1:])
            if main_rank:
                print(f"round {r + 1}/{opts.rounds} done", flush=True)
        peaks = {}
        for name in names:
            with LiveTensorBytes("cpu") as live:
                run(name, base, rows, opts, 2, out)
            peaks[name] = live.peak

    ref_time = statistics.median(times["trainer"])
    lines = [
        f"## Commit {commit()}, {datetime.date.today()}",
        "",
        f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}. GPT2LMHeadModel, "
        f"{opts.layers} layers at GPT-2-small widths, vocabulary {config.vocab_size}; "
        f"micro-batch {opts.micro_batch} x {opts.seq} tokens, K={opts.accum_steps}; "
        f"{opts.rounds} rounds of {opts.steps} steps per provider"
        + (f"; DDP over {world} gloo processes (peak per process)." if world > 1 else "."),
        "",
        "| provider | step speed vs trainer (median) | peak tensor MiB | vs trainer | "
        "first logged grad_norm, rel. diff vs trainer | parameters, max rel. diff vs trainer |",
        "|---|---|---|---|---|---|",
    ]
    ref_model, ref_norms = finals["trainer"]
    results = {}
    for name in names:
        model, norms = finals[name]
        diff = max(
            (torch.linalg.vector_norm(p - q) / torch.linalg.vector_norm(q)).item()
            for p, q in zip(model.parameters(), ref_model.parameters(), strict=True)
        )
        norm_diff = abs(norms[0] - ref_norms[0]) / ref_norms[0]  # the first window's
        speed = ref_time / statistics.median(times[name])
        results[name] = {
            "speed": speed,
            "peak": peaks[name] / peaks["trainer"],
            "grad_norm_diff": norm_diff,
        }
        lines.append(
            f"| {name} | {speed:.2f}x | "
            f"{peaks[name] / 2**20:.1f} | {peaks[name] / peaks['trainer']:.2f}x | "
            f"{norm_diff:.1e} | {diff:.1e} |"
        )
    report = "\n".join(lines) + "\n"
    if not main_rank:
        return results
    print(report)
    if opts.out is not None:
        with opts.out.open("a") as f:
            f.write("\n" + report)
    return results


if __name__ == "__main__":
    main()
