"""FastaccumTrainer on 2 gloo ranks: Trainer's DDP (accelerate wraps the model after the
optimizer is built, and the wrapper takes the DDP over at the first micro-batch).

Each rank runs Trainer as under ``torchrun --nproc_per_node 2`` on the CPU. accelerate
hands micro-batch i of the sequential order to rank ``i % 2``, so one window of K
micro-batches of B per rank holds the sequences of one DDP step at B·K per rank and
gradient_accumulation_steps=1: the large-batch reference, here run by Trainer itself on
the same ranks.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState

import fastaccum
from fastaccum.distributed import DDPWindow, _window_comm_hook
from tests.distributed.launch import by_name, scenario_test
from tests.hf_helpers import (
    OPTIMS,
    B,
    K,
    MemoryLimit,
    SequentialFastaccumTrainer,
    SequentialTrainer,
    arguments,
    assert_same_training,
    dataset,
    tiny_gpt2,
    train,
)

WHOLE = 32  # sequences: 16 micro-batches, 2 full windows per rank and epoch
SHORT = 24  # 12 micro-batches: windows of 4 and 2 per rank


@contextlib.contextmanager
def trainer_ranks(rank: int, world: int) -> Iterator[Path]:
    """The environment torchrun gives Trainer (the gloo group already exists), and a
    directory shared by the ranks; accelerate's process-wide state and the environment
    are restored afterwards, for the scenarios that run after these."""
    saved = dict(os.environ)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world)
    )
    box = [tempfile.mkdtemp(prefix="fastaccum-trainer-") if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    try:
        yield Path(box[0])
    finally:
        AcceleratorState._reset_state(True)
        os.environ.clear()
        os.environ.update(saved)


def run(
    cls, out: Path, batch: int, accum: int, n: int, model=None, opt=None, fuse=False, **overrides
):
    """:func:`tests.hf_helpers.train` on ``n`` sequences, on both ranks, with ``opt`` as
    the optimizer when given; ``fuse=True`` passes ``fuse_wgrad=True`` to a
    FastaccumTrainer."""
    extra = {"optimizers": (opt, None), **({"fuse_wgrad": True} if fuse else {})}
    model, trainer = train(cls, out, batch, accum, model, extra, n=n, **overrides)
    assert trainer.args.world_size == 2
    return model, trainer


@contextlib.contextmanager
def boundary_reductions() -> Iterator[list[bool]]:
    """Per window boundary, whether DDP's communication hook had already reduced every
    accumulator during the last backward (the overlapped path, sync on for the window's
    last micro-batch) before the wrapper's own boundary pass; calls pass through."""
    seen: list[bool] = []
    real = DDPWindow.reduce_accumulators

    def observed(window: DDPWindow) -> Any:
        seen.append(all(id(p) in window._reduced for p in window._reducible()))
        return real(window)

    DDPWindow.reduce_accumulators = observed
    try:
        yield seen
    finally:
        DDPWindow.reduce_accumulators = real


def assert_drives_the_ddp(trainer, windows: int) -> None:
    """The wrapper took over the DDP accelerate made (with .grad as views of DDP's
    buckets): its communication hook is the wrapper's and the window counts are global."""
    opt = trainer.fastaccum_optimizer
    ddp = trainer.model_wrapped
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    assert opt.model is ddp and opt._dist is not None and opt._dist.model is ddp
    assert [hook for hook, _ in ddp._comm_hooks] == [_window_comm_hook]
    assert ddp.gradient_as_bucket_view  # no gradient set allocated at the boundary
    stats = opt.stats()
    assert stats["windows"] == windows and stats["micro_step"] == 0
    assert stats["skipped_windows"] == 0


def trainer_ddp_equals_the_large_batch(rank: int, world: int) -> None:
    """SGD-momentum and AdamW, each with and without fuse_wgrad, 2 epochs: parameters,
    logged grad norms and losses equal Trainer's DDP at B·K per rank (rel 1e-5), and every
    window feeds the noise scale."""
    with trainer_ranks(rank, world) as out:
        for optim in ("sgd", "adamw"):
            ref_model, ref = run(SequentialTrainer, out / "ref", B * K, 1, WHOLE, **OPTIMS[optim])
            for fuse in (False, True):
                with boundary_reductions() as overlapped:
                    model, ours = run(
                        SequentialFastaccumTrainer,
                        out / f"{optim}-{fuse}",
                        B,
                        K,
                        WHOLE,
                        fuse=fuse,
                        **OPTIMS[optim],
                    )
                assert overlapped == [True] * 4
                assert_same_training(model, ours, ref_model, ref, steps=4)
                assert_drives_the_ddp(ours, windows=4)
                # without num_items the wrapper counts micro-batches, over both ranks
                assert ours.fastaccum_optimizer.stats()["items_seen"] == 4 * K * world
                # every window feeds the noise scale under DDP, fused weight gradients or not
                assert ours.fastaccum_optimizer.noise_scale_tracker.windows == 4


def trainer_ddp_tokens_averaged_per_rank(rank: int, world: int) -> None:
    """``average_tokens_across_devices=False``: each rank divides by its own window's token
    count and DDP averages the ranks. The same run as Trainer's own DDP accumulation with
    that setting (rel 1e-5); the ranks hold other sequences than at B·K per rank, so the
    large batch is no reference here, and the global token mean differs."""
    settings = {**OPTIMS["sgd"], "average_tokens_across_devices": False}
    with trainer_ranks(rank, world) as out:
        ref_model, ref = run(SequentialTrainer, out / "ref", B, K, WHOLE, **settings)
        model, ours = run(SequentialFastaccumTrainer, out / "fa", B, K, WHOLE, **settings)
        assert_same_training(model, ours, ref_model, ref, steps=4)
        assert_drives_the_ddp(ours, windows=4)
        global_mean, _ = run(SequentialTrainer, out / "global", B * K, 1, WHOLE, **OPTIMS["sgd"])
        assert not torch.allclose(model.lm_head.weight, global_mean.lm_head.weight, rtol=1e-3)


def trainer_ddp_short_windows_and_fused_adamw(rank: int, world: int) -> None:
    """Short last windows (4, 2 micro-batches per rank) with a prebuilt fused
    ``fastaccum.optim.AdamW``: the same run as Trainer's own DDP accumulation with torch's
    AdamW."""
    settings = {"adam_epsilon": 1e-3, "max_grad_norm": 0.8}

    def adamw(net, cls, **extra):
        return cls(net.parameters(), lr=0.01, eps=1e-3, weight_decay=0.1, **extra)

    with trainer_ranks(rank, world) as out:
        ref_model = tiny_gpt2()
        ref_opt = adamw(ref_model, torch.optim.AdamW)
        _, ref = run(
            SequentialTrainer, out / "ref", B, K, SHORT, model=ref_model, opt=ref_opt, **settings
        )
        model = fastaccum.fuse_wgrad(tiny_gpt2())
        opt = adamw(model, fastaccum.optim.AdamW, accum_steps=K, max_grad_norm=0.8, model=model)
        with boundary_reductions() as overlapped:
            _, ours = run(
                SequentialFastaccumTrainer,
                out / "fa",
                B,
                K,
                SHORT,
                model=model,
                opt=opt,
                **settings,
            )
        assert overlapped == [True] * 4  # the short windows too
        assert ours.fastaccum_optimizer is opt
        assert_same_training(model, ours, ref_model, ref, steps=4)
        assert_drives_the_ddp(ours, windows=4)


class FastaccumLimited(MemoryLimit, SequentialFastaccumTrainer):
    pass


def trainer_ddp_auto_find_batch_size(rank: int, world: int) -> None:
    """``auto_find_batch_size`` under DDP, 4 x 2 asked for and room for 2 on both ranks:
    the retry wraps the model in a new DDP, which the wrapper takes over, and trains at
    2 x 4 as Trainer's DDP does at 8 per rank."""
    with trainer_ranks(rank, world) as out:
        ref_model, ref = run(SequentialTrainer, out / "ref", B * K, 1, WHOLE, **OPTIMS["sgd"])
        with pytest.warns(UserWarning, match="retrying with 2 x 4"):
            model, ours = run(
                FastaccumLimited,
                out / "fa",
                4,
                2,
                WHOLE,
                auto_find_batch_size=True,
                **OPTIMS["sgd"],
            )
        assert_same_training(model, ours, ref_model, ref, steps=4)
        assert_drives_the_ddp(ours, windows=4)


def trainer_ddp_resume_is_bit_identical(rank: int, world: int) -> None:
    """A Trainer checkpoint of the DDP run (saved by rank 0 at a window boundary) resumes
    on both ranks to the parameters of the run that never stopped."""
    settings = {**OPTIMS["adamw"], "save_strategy": "steps", "save_steps": 2}
    with trainer_ranks(rank, world) as out:
        whole, _ = run(SequentialFastaccumTrainer, out, B, K, WHOLE, **settings)
        resumed = tiny_gpt2(seed=5)  # other weights: the checkpoint brings them back
        trainer = SequentialFastaccumTrainer(
            model=resumed,
            args=arguments(out, B, K, **settings),
            train_dataset=dataset(n=WHOLE),
        )
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
        for p, q in zip(resumed.parameters(), whole.parameters(), strict=True):
            assert torch.equal(p, q)
        assert_drives_the_ddp(trainer, windows=4)  # 2 of them counted before the save
        assert math.isfinite(trainer.state.log_history[-2]["grad_norm"])


def bind_ddp_refusals(rank: int, world: int) -> None:
    """``_bind_ddp`` refuses another module's DDP, a window in progress and a non-DDP,
    changing nothing; binding the same DDP twice is a no-op, and a new DDP of the same
    module takes the old one's place."""
    model = tiny_gpt2()
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), K, model=model)
    names = dict(opt._names)
    other = torch.nn.parallel.DistributedDataParallel(tiny_gpt2())
    with pytest.raises(ValueError, match="another module"):
        opt._bind_ddp(other)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        opt._bind_ddp(model)
    batch = {k: torch.stack([r[k] for r in dataset()[:B]]) for k in ("input_ids", "labels")}
    opt.backward(model(**batch).loss)
    with pytest.warns(UserWarning, match="not the DistributedDataParallel"):  # not bound yet
        opt.step()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    with pytest.raises(RuntimeError, match="between windows"):
        opt._bind_ddp(ddp)
    assert opt._dist is None and opt.model is model and opt._names == names
    assert not ddp._comm_hooks
    for _ in range(K - 1):  # close the window locally, then take the DDP over
        opt.backward(model(**batch).loss)
        opt.step()
    opt._bind_ddp(ddp)
    opt._bind_ddp(ddp)
    assert opt.model is ddp and opt._names[id(next(model.parameters()))].startswith("module.")
    assert [hook for hook, _ in ddp._comm_hooks] == [_window_comm_hook]
    # Trainer's auto_find_batch_size makes a new DDP around the same module on a retry
    again = torch.nn.parallel.DistributedDataParallel(model)
    opt._bind_ddp(again)
    assert opt.model is again and opt._dist.model is again
    assert [hook for hook, _ in again._comm_hooks] == [_window_comm_hook]
    with pytest.raises(ValueError, match="another module"):
        opt._bind_ddp(other)


SCENARIOS = by_name(
    trainer_ddp_equals_the_large_batch,
    trainer_ddp_tokens_averaged_per_rank,
    trainer_ddp_short_windows_and_fused_adamw,
    trainer_ddp_resume_is_bit_identical,
    trainer_ddp_auto_find_batch_size,
    bind_ddp_refusals,
)
test_scenario = scenario_test(SCENARIOS)
