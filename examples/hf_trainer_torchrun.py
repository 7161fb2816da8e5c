"""The Hugging Face Trainer on several processes, with fastaccum doing the accumulation.

``FastaccumTrainer`` is ``transformers.Trainer`` with the same arguments. Under
``torchrun`` accelerate wraps the model in DDP, as it does for Trainer, and fastaccum takes
that DDP over: no gradient sync inside a window, one all-reduce of the fp32 accumulators
per DDP bucket per window, during the window's last backward.

The model is the 2-block GPT-2 of examples/hf_gpt2.py, built from a config (no download). Its sequences have 8 to
64 tokens, right-padded, with the padding labelled -100, so micro-batches hold different
numbers of tokens; Trainer divides each window by its token count over all ranks.

    torchrun --nproc_per_node 2 examples/hf_trainer_torchrun.py --fuse-wgrad
    torchrun --nproc_per_node 2 examples/hf_trainer_torchrun.py --native   # stock Trainer
    python -m torch.distributed.run --nproc_per_node 2 --standalone \\
        examples/hf_trainer_torchrun.py --steps 3 --save /tmp/model.pt      # what CI runs

Rank 0 prints one JSON line: the logged losses and gradient norms, how far the parameters
moved, and for fastaccum the windows it stepped and whether it drove the DDP. Both trainers make the same updates, to
float rounding.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections.abc import Sequence

import torch
from hf_gpt2 import IGNORE, make_model  # examples/hf_gpt2.py: a 2-block GPT-2 over bytes
from transformers import Trainer, TrainingArguments

from fastaccum.integrations import FastaccumTrainer

VOCAB, LENGTH = 256, 64  # the model's vocabulary and positions


def make_dataset(count: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``count`` sequences of 8 to LENGTH tokens following t -> (5t + 3) mod VOCAB from a
    random start (learnable), right-padded to LENGTH; padding is masked and labelled
    IGNORE."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        n = int(torch.randint(8, LENGTH + 1, (), generator=gen))
        ids = torch.zeros(LENGTH, dtype=torch.long)
        ids[0] = torch.randint(0, VOCAB, (), generator=gen)
        for t in range(1, n):
            ids[t] = (5 * ids[t - 1] + 3) % VOCAB
        mask = (torch.arange(LENGTH) < n).long()
        rows.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)}
        )
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    """Train and return the summary (printed as JSON on rank 0)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per step (K)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--native", action="store_true", help="train with stock Trainer")
    parser.add_argument("--fuse-wgrad", action="store_true", help="FastaccumTrainer(fuse_wgrad=)")
    parser.add_argument("--save", help="rank 0 saves the final state_dict here")
    args = parser.parse_args(argv)

    model = make_model(seed=0)
    start = [p.detach().clone() for p in model.parameters()]
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.accum,
            max_steps=args.steps,
            learning_rate=3e-3,
            lr_scheduler_type="cosine",
            warmup_steps=2,
            weight_decay=0.01,
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            seed=0,
            disable_tqdm=True,
            log_level="error",
        )
        world = training.world_size
        dataset = make_dataset(args.steps * args.accum * args.batch * world)
        if args.native:
            trainer = Trainer(model=model, args=training, train_dataset=dataset)
        else:
            trainer = FastaccumTrainer(
                model=model, args=training, train_dataset=dataset, fuse_wgrad=args.fuse_wgrad
            )
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "grad_norm" in entry]
    summary: dict = {
        "trainer": "native" if args.native else "fastaccum",
        "world": world,
        "losses": [entry["loss"] for entry in logs],
        "grad_norms": [entry["grad_norm"] for entry in logs],
        # relative distance of the parameters from where they started
        "moved": math.sqrt(
            sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), start, strict=True))
            / sum((q**2).sum() for q in start)
        ),
    }
    if not args.native:
        opt = trainer.fastaccum_optimizer
        summary["windows"] = opt.stats()["windows"]
        summary["drives_ddp"] = opt.model is trainer.model_wrapped and world > 1
    if trainer.is_world_process_zero():
        if args.save:
            torch.save(model.state_dict(), args.save)
        print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
