"""fastaccum inside a Hugging Face ``accelerate`` training loop.

accelerate places the model (and wraps it in DDP under a multi-process launch); fastaccum
does the accumulation, with accelerate's own ``gradient_accumulation_steps`` left at 1.
The reference is plain torch on the concatenated batch of each window, as in
test_wrapper.py.
"""

import pytest
import torch

pytest.importorskip("accelerate")
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

import fastaccum
from tests.helpers import (
    assert_close_rel,
    large_batch_run,
    make_model,
    make_opt,
    mean_loss,
    split_windows,
    token_batches,
)

K = 4


@pytest.fixture
def accelerator():
    """A CPU Accelerator; accelerate keeps its state process-wide, so it is reset after."""
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def halving(step: int) -> float:
    return 0.5**step


def reference(batches):
    return large_batch_run(
        lambda params: make_opt("adamw", params),
        split_windows(batches, K),
        max_grad_norm=0.5,
        make_sched=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, halving),
    )[0]


@pytest.mark.parametrize("mode", ["accelerator.backward", "opt.backward"])
def test_prepared_model_with_the_wrapper_and_scheduler_outside(accelerator, mode):
    """The recommended split: ``accelerator.prepare(model)``, the wrapper built on the
    prepared model, the scheduler on the wrapper and stepped when ``opt.step()`` returns
    True. Equals the large batch."""
    batches = token_batches(3 * K + 1, seed=21)
    model = accelerator.prepare(make_model())
    opt = fastaccum.wrap(make_opt("adamw", model.parameters()), K, model=model, max_grad_norm=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, halving)
    for x, y in batches:
        loss = mean_loss(model, x, y)
        if mode == "opt.backward":
            opt.backward(loss, num_items=len(y))
            stepped = opt.step()
        else:
            accelerator.backward(loss)
            stepped = opt.step(num_items=len(y))
        opt.zero_grad()
        if stepped:
            sched.step()
    assert opt.flush() is True
    sched.step()
    for p, q in zip(model.parameters(), reference(batches).parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def test_wrapper_passed_through_prepare(accelerator):
    """``accelerator.prepare(model, opt)`` puts its AcceleratedOptimizer around the
    wrapper; stepping that every micro-batch reaches the wrapper's step, which steps the
    inner optimizer once per window. ``num_items`` goes in through ``opt.backward``."""
    batches = token_batches(3 * K, seed=22)
    model = make_model()
    opt = fastaccum.wrap(make_opt("adamw", model.parameters()), K, model=model, max_grad_norm=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, halving)
    model, prepared = accelerator.prepare(model, opt)
    assert prepared.optimizer is opt
    for x, y in batches:
        opt.backward(mean_loss(model, x, y), num_items=len(y))
        prepared.step()
        prepared.zero_grad()
        if opt.micro_step == 0:
            sched.step()
    assert opt.stats()["windows"] == 3
    for p, q in zip(model.parameters(), reference(batches).parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def test_a_prepared_scheduler_runs_k_times_too_fast_and_is_caught(accelerator):
    """accelerate's AcceleratedScheduler steps on every call while its gradient
    accumulation is 1, that is on every micro-batch: the wrapper sees the learning rate
    change inside a window and warns, naming the fix."""
    model = make_model()
    opt = fastaccum.wrap(make_opt("adamw", model.parameters()), K, model=model)
    model, prepared, sched = accelerator.prepare(
        model, opt, torch.optim.lr_scheduler.LambdaLR(opt, halving)
    )
    with pytest.warns(RuntimeWarning, match=r"step it only when opt\.step\(\) returns True"):
        for x, y in token_batches(2, seed=23):
            opt.backward(mean_loss(model, x, y), num_items=len(y))
            prepared.step()
            sched.step()
