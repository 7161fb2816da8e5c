"""Data-parallel training with fastaccum under torchrun (DDP, or FSDP2 with ``--fsdp``;
gloo on CPU, NCCL on GPUs).

Each rank trains on its own micro-batches of padded, variable-length token sequences; the
loss of a micro-batch is the mean over its real (non-padding) target tokens, so ranks and
micro-batches carry different numbers of items. ``fastaccum.wrap(..., model=ddp)``:

- turns DDP's gradient sync off before the forward of every micro-batch inside a window
  and on for the window's last one (no ``no_sync()`` in the loop),
- all-reduces the window's fp32 accumulators once per DDP bucket during that last backward,
- sums the item counts over ranks, so the step uses the mean over every real token of all
  ranks' window, as one process training on the concatenated batches would.

With ``--fsdp`` the model is sharded with ``fully_shard`` (each layer with parameters, then
the whole) and the optimizer is ``fastaccum.optim.AdamW(..., model=model)``: FSDP2
reduce-scatters once per window, and the window's update runs as one fused pass over each
rank's shards. ``--save`` then gathers the full state dict on rank 0.

    torchrun --nproc_per_node 2 examples/ddp_torchrun.py --steps 50
    torchrun --nproc_per_node 2 examples/ddp_torchrun.py --steps 50 --fsdp
    python -m torch.distributed.run --nproc_per_node 2 --standalone \\
        examples/ddp_torchrun.py --steps 3 --save /tmp/model.pt      # what CI runs

Rank 0 prints one JSON line per optimizer step and a final summary line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import fastaccum

VOCAB, DIM, PAD = 64, 32, -100


def make_model(seed: int = 0) -> torch.nn.Sequential:
    """A tiny per-token model: embedding, MLP, vocabulary head."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(VOCAB, DIM),
        torch.nn.Linear(DIM, 4 * DIM),
        torch.nn.GELU(),
        torch.nn.Linear(4 * DIM, VOCAB),
    )


def micro_batches(rank: int, count: int, seqs: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` micro-batches of ``seqs`` sequences of 4 to 48 tokens, right-padded; the
    target of token t is (t * 5 + 3) mod VOCAB (learnable), padding targets are PAD."""
    gen = torch.Generator().manual_seed(1234 + rank)
    batches = []
    for _ in range(count):
        lengths = torch.randint(4, 49, (seqs,), generator=gen)
        x = torch.randint(0, VOCAB, (seqs, int(lengths.max())), generator=gen)
        y = (x * 5 + 3) % VOCAB
        y[torch.arange(x.shape[1]) >= lengths[:, None]] = PAD
        batches.append((x, y))
    return batches


def token_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the real target tokens of the micro-batch."""
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=PAD)


ADAMW = {"lr": 1e-2, "weight_decay": 0.01}


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, **ADAMW)


def distribute(
    model: torch.nn.Module, args: argparse.Namespace
) -> tuple[torch.nn.Module, fastaccum.AccumulatingOptimizer]:
    """(the module to run, the optimizer): DDP and a wrapped AdamW, or with ``--fsdp`` the
    fully_shard-ed model and fastaccum's fused AdamW."""
    if not args.fsdp:
        ddp = DDP(model)
        opt = fastaccum.wrap(
            make_optimizer(ddp.parameters()),
            args.accum_steps,
            model=ddp,
            max_grad_norm=args.max_grad_norm,
        )
        return ddp, opt
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    opt = fastaccum.optim.AdamW(
        model.parameters(),
        **ADAMW,
        accum_steps=args.accum_steps,
        max_grad_norm=args.max_grad_norm,
        model=model,
    )
    return model, opt


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on every rank (shards gathered under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps (windows)")
    parser.add_argument("--accum-steps", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--save", help="rank 0 writes the trained state_dict here")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 and the fused AdamW")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)

    model = make_model().to(device)
    run, opt = distribute(model, args)
    for x, y in micro_batches(rank, args.steps * args.accum_steps):
        x, y = x.to(device), y.to(device)
        loss = token_loss(run, x, y)
        opt.backward(loss, num_items=int((y != PAD).sum()))  # real tokens of this rank
        if opt.step() and rank == 0:
            stats = opt.stats()
            print(
                json.dumps(
                    {
                        "step": stats["windows"],
                        "loss": round(loss.item(), 4),  # rank 0's last micro-batch
                        "grad_norm": round(stats["grad_norm"], 4),
                        "items_seen": stats["items_seen"],  # tokens of all ranks so far
                    }
                ),
                flush=True,
            )

    # Every rank applied the same update: check it, as a data-parallel run must.
    state = full_state(model)
    flat = torch.cat([t.detach().flatten().to(device) for t in state.values()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    in_sync = all(torch.equal(copies[0], c) for c in copies)
    if rank == 0:
        stats = opt.stats()
        summary = {
            "world": world,
            "windows": stats["windows"],
            "items_seen": stats["items_seen"],
            "ranks_in_sync": in_sync,
        }
        print(json.dumps({"summary": summary}), flush=True)
        if args.save:
            torch.save({name: t.cpu() for name, t in state.items()}, args.save)
    # Free DDP (its reducer holds gloo work objects) while Python is fully alive: left to
    # interpreter shutdown, gloo aborts the process now and then ("terminate called without
    # an active exception") after a run that succeeded.
    del opt, run, model
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
