"""fastaccum.wrap(opt, K, model=fully_shard(..., mesh=2-D)) (HSDP) on 4 gloo ranks: a
(replicate=2, shard=2) mesh. The reference is one process training on the concatenated
batches of all 4 ranks, as in test_fsdp.py; the scenarios run in their own spawn of 4
processes (test_fsdp.py's share the 2-rank one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

import fastaccum
from tests.distributed.data import WINDOWS, K, global_windows, rank_batches
from tests.distributed.launch import by_name, run_scenarios
from tests.distributed.test_fsdp import (
    adamw,
    assert_matches,
    check_noise_scale,
    sharded_model,
    train,
)
from tests.helpers import large_batch_run

WORLD = 4


def hsdp_model(fuse: bool = False) -> torch.nn.Module:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    return sharded_model(fuse=fuse, mesh=mesh)


def window_modes(rank: int, world: int) -> None:
    """Both modes (gradient sync off in the window; reduce-scatter every micro-batch, with
    flush() of a partial last window), the default one with fuse_wgrad too: training
    equals the large batch of all 4 ranks, clipped by the global norm (each shard counted
    once, not once per replica)."""
    n = K * WINDOWS
    want, _ = large_batch_run(adamw, global_windows(world, n), max_grad_norm=0.2)
    for every, fuse in ((False, False), (False, True), (True, False)):
        model = hsdp_model(fuse)
        opt = fastaccum.wrap(
            adamw(model.parameters()),
            K,
            model=model,
            max_grad_norm=0.2,
            reduce_scatter_every_micro_step=every,
        )
        train(model, opt, rank_batches(rank, n))
        assert opt.stats()["grad_norm"] > 0.2
        assert_matches(model, want)
    assert opt.stats()["windows"] == WINDOWS


def window_norm_and_noise_scale(rank: int, world: int) -> None:
    """With lr 0: the window norm equals the float64 norm of the 4 ranks' window, and the
    noise scale in both modes equals the estimator fed float64 gradients (test_fsdp.py's
    checks on the HSDP model)."""
    check_noise_scale(rank, hsdp_model)


SCENARIOS_4 = by_name(window_modes, window_norm_and_noise_scale)


@pytest.fixture(scope="module")
def outcomes_4(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_scenarios(SCENARIOS_4, Path(tmp_path_factory.mktemp("hsdp")), world=WORLD)


@pytest.mark.parametrize("name", list(SCENARIOS_4))
def test_hsdp(outcomes_4: dict, name: str) -> None:
    for rank, error in enumerate(outcomes_4[name]):
        assert error is None, f"rank {rank}:\n{error}"
