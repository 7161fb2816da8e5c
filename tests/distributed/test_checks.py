"""Checks that need no second process: the loss-divided-by-K warning, option errors, and
DDP's single communication hook (on a one-process gloo group)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fastaccum
from fastaccum.distributed import loss_divided_by
from tests.distributed.launch import free_port
from tests.helpers import make_model, mean_loss, token_batches


def test_loss_divided_by_recognizes_division_by_k():
    w = torch.randn(3, requires_grad=True)
    loss = (w * 2).sum()
    assert loss_divided_by(loss / 4, 4)
    assert loss_divided_by(loss * 0.25, 4)
    assert loss_divided_by((loss / 4).double() * 1024.0, 4)  # cast, then scaler.scale
    assert loss_divided_by(loss.div(torch.tensor(4.0)), 4)
    assert not loss_divided_by(loss, 4)
    assert not loss_divided_by(loss / 3, 4)
    assert not loss_divided_by(w.mean(), 3)  # a mean over 3 items is not a division by K
    assert not loss_divided_by(torch.tensor(1.0), 4)  # no autograd graph


def test_opt_backward_warns_once_on_loss_divided_by_k():
    model = make_model()
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 4, model=model)
    batches = token_batches(4, seed=2)
    with pytest.warns(UserWarning, match="looks divided by accum_steps=4") as caught:
        for x, y in batches:
            opt.backward(mean_loss(model, x, y) / 4, num_items=len(y))
            opt.step()
    assert sum("accum_steps" in str(w.message) for w in caught) == 1


def test_opt_backward_does_not_warn_on_a_plain_mean_loss():
    model = make_model()
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 4, model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in token_batches(4, seed=2):
            opt.backward(mean_loss(model, x, y), num_items=len(y))
            opt.step()


def test_reduce_scatter_option_needs_an_fsdp_model():
    model = make_model()
    with pytest.raises(ValueError, match="FSDP2 models only"):
        fastaccum.wrap(
            torch.optim.SGD(model.parameters(), lr=0.1),
            4,
            model=model,
            reduce_scatter_every_micro_step=True,
        )


@pytest.fixture
def one_process_group():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_ddp_with_its_own_comm_hook_is_refused(one_process_group):
    model = make_model()
    ddp = DDP(model)
    ddp.register_comm_hook(None, lambda state, bucket: bucket.buffer())
    with pytest.raises(RuntimeError, match="communication hook"):
        fastaccum.wrap(torch.optim.SGD(ddp.parameters(), lr=0.1), 4, model=ddp)


def test_ddp_sync_flag_follows_the_window(one_process_group):
    """Before every forward the flag says whether that micro-batch closes the window, and
    a state dict restored mid-window sets it from the restored micro-step."""
    model = make_model()
    ddp = DDP(model)
    opt = fastaccum.wrap(torch.optim.SGD(ddp.parameters(), lr=0.1), 3, model=ddp)
    flags = []
    for x, y in token_batches(7, seed=3):
        flags.append(ddp.require_backward_grad_sync)
        opt.backward(mean_loss(ddp, x, y), num_items=len(y))
        opt.step()
    assert flags == [False, False, True] * 2 + [False]
    state = opt.state_dict()  # saved after 1 micro-batch of the third window
    x, y = token_batches(1, seed=4)[0]
    opt.backward(mean_loss(ddp, x, y), num_items=len(y))
    opt.step()
    assert ddp.require_backward_grad_sync  # the next micro-batch closes the window
    opt.load_state_dict(state)
    assert not ddp.require_backward_grad_sync


def test_float64_parameters_under_ddp_are_refused(one_process_group):
    ddp = DDP(make_model(dtype=torch.float64))
    with pytest.raises(TypeError, match=r"module\.0\.weight is torch\.float64; under DDP"):
        fastaccum.wrap(torch.optim.SGD(ddp.parameters(), lr=0.1), 4, model=ddp)
    assert not getattr(ddp, "_comm_hooks", [])  # no communication hook was registered

    model = DDP(make_model())
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 4, model=model)
    extra = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex64; under DDP"):
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == len(opt.optimizer.param_groups) == 1
