"""torch.distributed.checkpoint (DCP) with a wrapper given as the optimizer.

``get_state_dict(model, opt)`` / ``set_state_dict`` treat the wrapper as a plain
``torch.optim`` optimizer: they create missing state with a ``step()`` on zero gradients
at lr 0, and read and write ``torch.optim``-format state dicts. At a window boundary that
is all the state there is. The reference is the same run without the checkpoint.
"""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import fastaccum
import fastaccum.optim as fo
from tests.helpers import OPTIM_KINDS, make_model, members_of, micro_step, token_batches

K = 4
# DCP in one process, without a process group, says so on every save and load.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def build(setup: str, seed: int = 0):
    model = make_model(seed)
    if setup == "fused_class":
        return model, fo.AdamW(model.parameters(), **OPTIM_KINDS["AdamW"], accum_steps=K)
    if setup == "wrap":
        inner = torch.optim.AdamW(model.parameters(), **OPTIM_KINDS["AdamW"])
    else:  # a list: torch's own members, or the AdamW one as fastaccum.optim.AdamW
        inner = members_of("fused-adamw" if setup == "chain_fused" else "torch")(model.parameters())
    return model, fastaccum.wrap(inner, K, model=model, max_grad_norm=0.5)


def train(model, opt, batches) -> None:
    for x, y in batches:
        micro_step(model, opt, x, y)


@pytest.mark.parametrize("setup", ["wrap", "chain", "chain_fused", "fused_class"])
def test_saved_at_a_boundary_and_loaded_into_a_fresh_wrapper(setup, tmp_path):
    """dcp.save after one window, dcp.load into a wrapper that never stepped: the run goes
    on bit-identically. The fresh wrapper's state-creating step is the wrapped
    optimizer's, not a micro-batch (its window stays empty)."""
    batches = token_batches(4 * K, seed=3)
    straight, straight_opt = build(setup)
    train(straight, straight_opt, batches)

    model, opt = build(setup)
    train(model, opt, batches[:K])
    model_sd, optim_sd = get_state_dict(model, opt)
    assert set(optim_sd) == {"state", "param_groups"} and "0.weight" in optim_sd["state"]
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path)

    model, opt = build(setup, seed=99)
    model_sd, optim_sd = get_state_dict(model, opt)  # DCP steps the fresh wrapper here
    assert opt.micro_step == 0 and opt.stats()["windows"] == 0
    assert all(p.grad is None for p in model.parameters())
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=tmp_path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, opt, batches[K:])
    for p, q in zip(model.parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("first_window", [False, True])
def test_inside_a_window_it_is_refused_and_changes_nothing(first_window):
    """get_state_dict two micro-batches into a window: a RuntimeError that says to save
    at a boundary. Learning rates and the window are as they were, and the run equals the
    one without the attempt. In the first window the wrapped optimizer has no state yet,
    and DCP first steps it on zero gradients at lr 0 (SGD with momentum: the buffer it
    makes is replaced by the first real step's)."""
    batches = token_batches(3 * K, seed=4)
    stop = 2 if first_window else K + 2

    def run(attempt: bool) -> torch.nn.Module:
        model = make_model()
        opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), K)
        for i, (x, y) in enumerate(batches):
            if attempt and i == stop:
                with pytest.raises(RuntimeError, match=r"not a window in progress \(2 of 4"):
                    get_state_dict(model, opt)
                assert opt.micro_step == 2 and opt.param_groups[0]["lr"] == 0.1
                assert all(p.grad is None for p in model.parameters())
            micro_step(model, opt, x, y)
        return model

    for p, q in zip(run(True).parameters(), run(False).parameters(), strict=True):
        assert torch.equal(p, q)
