"""Train a Hugging Face ``transformers`` GPT-2 with ``fastaccum.wrap`` and ``num_items``.

The model is built from a small ``GPT2Config`` (no weight or tokenizer download): tokens
are bytes (vocabulary 256) of a Python standard library source file. Sequences have
different lengths, so every micro-batch is right-padded and its padding positions carry
the label -100 (ignored by the loss): micro-batches hold different numbers of tokens.

Each micro-batch's loss is the mean over its own tokens, and ``opt.step(num_items=n)``
tells fastaccum how many tokens that mean was over. The window's gradient is then the
mean over every token of the window, exactly what one large batch gives; a plain
``(loss / K).backward()`` loop would weigh a token of a short micro-batch more than one
of a long micro-batch.

    python examples/hf_gpt2.py                 # 40 optimizer steps, prints the losses
    python examples/hf_gpt2.py --smoke         # 4 steps, asserts the outcome (CI)

With ``--fuse-wgrad``, ``fastaccum.fuse_wgrad(model)`` first switches every weight of
the model to fused weight-gradient accumulation (GPT-2's ``Conv1D`` projections, the
token and position embeddings, and the tied LM head), and each micro-batch goes through
``opt.backward(loss, num_items=n)``: no parameter ever holds a ``.grad``.

With ``--check`` (on in ``--smoke``) the same windows are also trained with native
PyTorch as one large batch each (token-mean loss over the padded window) and the largest
parameter difference is printed and asserted; ``--smoke`` checks the fused run too.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import fastaccum

IGNORE = -100  # the label transformers and F.cross_entropy skip
PAD = 0  # the NUL byte; never a target, since its labels are IGNORE


def make_model(seed: int) -> GPT2LMHeadModel:
    """A 2-block GPT-2 of width 64 over bytes, without dropout (so runs can be compared)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=256,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=PAD,
        eos_token_id=PAD,
    )
    return GPT2LMHeadModel(config)


def pad_batch(seqs: list[torch.Tensor], length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad byte sequences to one length: input ids, attention mask, labels (-100 at
    padding)."""
    length = length or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_windows(
    steps: int, accum_steps: int, micro_batch: int, seed: int
) -> list[list[list[torch.Tensor]]]:
    """``steps`` windows of ``accum_steps`` micro-batches of ``micro_batch`` byte sequences
    of random length 8..64, cut from the source of the ``argparse`` module."""
    text = torch.tensor(list(Path(argparse.__file__).read_bytes()), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    windows = []
    for _ in range(steps):
        window = []
        for _ in range(accum_steps):
            lengths = torch.randint(8, 65, (micro_batch,), generator=gen).tolist()
            starts = torch.randint(0, len(text) - 64, (micro_batch,), generator=gen).tolist()
            window.append([text[s : s + n] for s, n in zip(starts, lengths, strict=True)])
        windows.append(window)
    return windows


def token_loss(model: GPT2LMHeadModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy, the mean over the batch's real (non-padding) targets, and
    the number of those targets."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE
    )
    return loss, int((targets != IGNORE).sum())


def train_fastaccum(
    model,
    windows,
    lr: float,
    max_grad_norm: float,
    use_num_items: bool = True,
    fuse_wgrad: bool = False,
) -> list[float]:
    """fastaccum.wrap around torch's AdamW: one micro-batch per backward/step; returns the
    token-mean loss of each window. ``use_num_items=False`` weighs micro-batches equally
    (what ``(loss / K).backward()`` does), for comparison. ``fuse_wgrad`` fuses the
    model's weight gradients and backpropagates through ``opt.backward``."""
    if fuse_wgrad:
        fastaccum.fuse_wgrad(model)
    opt = fastaccum.wrap(
        torch.optim.AdamW(model.parameters(), lr=lr),
        accum_steps=len(windows[0]),
        model=model,
        max_grad_norm=max_grad_norm,
    )
    losses = []
    for window in windows:
        loss_sum, items = 0.0, 0
        for seqs in window:
            loss, n = token_loss(model, pad_batch(seqs))
            if fuse_wgrad:  # weight gradients go straight into fastaccum's accumulators
                opt.backward(loss, num_items=n)
                opt.step()
            else:
                loss.backward()
                # True at the K-th micro-batch: the window's update ran
                opt.step(num_items=n if use_num_items else None)
                opt.zero_grad()
            loss_sum, items = loss_sum + loss.item() * n, items + n
        losses.append(loss_sum / items)
    return losses


def train_native_large_batch(model, windows, lr: float, max_grad_norm: float) -> None:
    """The reference: each window as one padded batch, token-mean loss, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for window in windows:
        loss, _ = token_loss(model, pad_batch([s for seqs in window for s in seqs], 64))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        opt.zero_grad()


def max_abs_deviation(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest |a - b| over all parameters."""
    return max(
        (pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters(), strict=True)
    )


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Train, print a summary, and return it: window losses, tokens per micro-batch and
    (with --check) the parameter deviation from native large-batch training."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (windows)")
    parser.add_argument("--accum-steps", type=int, default=4, help="micro-batches per step, K")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fuse-wgrad", action="store_true", help="fastaccum.fuse_wgrad + opt.backward"
    )
    parser.add_argument("--check", action="store_true", help="compare with native PyTorch")
    parser.add_argument("--smoke", action="store_true", help="4 steps with --check; asserts")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.check = 4, True
    for name in ("steps", "accum_steps", "micro_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    windows = make_windows(args.steps, args.accum_steps, args.micro_batch, args.seed)
    model = make_model(args.seed)
    initial = copy.deepcopy(model)
    losses = train_fastaccum(model, windows, args.lr, 1.0, fuse_wgrad=args.fuse_wgrad)
    tokens = [int((pad_batch(seqs)["labels"][:, 1:] != IGNORE).sum()) for seqs in windows[0]]
    summary: dict[str, object] = {"losses": losses, "tokens_per_micro_batch": tokens}
    if args.check:
        equal_weights = copy.deepcopy(initial)
        train_fastaccum(equal_weights, windows, args.lr, 1.0, use_num_items=False)
        fused = None
        if args.smoke and not args.fuse_wgrad:
            fused = copy.deepcopy(initial)
            train_fastaccum(fused, windows, args.lr, 1.0, fuse_wgrad=True)
        train_native_large_batch(initial, windows, args.lr, max_grad_norm=1.0)
        summary["max_abs_deviation"] = max_abs_deviation(model, initial)
        summary["max_abs_deviation_without_num_items"] = max_abs_deviation(equal_weights, initial)
        if fused is not None:
            summary["max_abs_deviation_fuse_wgrad"] = max_abs_deviation(fused, initial)
    print(json.dumps(summary, indent=1))
    if args.smoke:
        assert all(math.isfinite(x) for x in losses), losses
        assert losses[-1] < losses[0], f"loss did not go down: {losses}"
        assert len(set(tokens)) > 1, "micro-batches should hold different numbers of tokens"
        assert summary["max_abs_deviation"] <= 1e-5, summary["max_abs_deviation"]
        assert summary.get("max_abs_deviation_fuse_wgrad", 0.0) <= 1e-5, summary
        # without num_items the update is measurably a different one
        assert summary["max_abs_deviation_without_num_items"] > 1e-4, summary
    return summary


if __name__ == "__main__":
    main()
