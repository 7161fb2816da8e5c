"""plan_batch on inputs beyond the plain case: a wrapper in the middle of a window that
uses num_items, models that cannot train on one sample, batches of the wrong size, and
arguments of the wrong kind. Each is checked against what the user had (a twin that
never planned) or against the error it must raise."""

import copy
import math
from collections import UserDict

import pytest
import torch

import fastaccum
from fastaccum.memory.planner import PlanningError, _split, plan_batch

WIDTH = 16


def _mlp(batchnorm: bool = False) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(WIDTH, 32)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(32))  # (N, C) input: needs 2 samples to train
    layers += [torch.nn.ReLU(), torch.nn.Linear(32, 4)]
    return torch.nn.Sequential(*layers)


def _batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, WIDTH), torch.randint(0, 4, (n,))


def _loss(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def test_mid_window_with_num_items_plans_and_leaves_the_window_as_it_was():
    torch.manual_seed(1)
    data = [_batch(int(n)) for n in torch.randint(2, 9, (12,))]
    runs = []
    for planned in (False, True):
        model = _mlp()
        opt = fastaccum.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), 4, model=model)
        for x, y in data[:6]:  # a window and a half, item-weighted
            opt.backward(_loss(model, (x, y)), num_items=len(y))
            opt.step()
        assert opt.micro_step == 2
        if planned:
            plan = plan_batch(
                model, _batch, 32, optimizer=opt, loss_fn=_loss, memory_budget=2**26,
                verbose=False,
            )  # fmt: skip
            assert plan.effective_batch_size == 32
            assert opt.micro_step == 2
        for x, y in data[6:]:
            opt.backward(_loss(model, (x, y)), num_items=len(y))
            opt.step()
        runs.append(copy.deepcopy(model.state_dict()))
    for key, value in runs[0].items():
        assert torch.equal(runs[1][key], value), key


def test_a_model_that_cannot_train_on_one_sample_plans_from_two():
    model = _mlp(batchnorm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(PlanningError, match=r"min_micro_batch_size=2") as err:
        plan_batch(model, _batch, 20, optimizer=opt, loss_fn=_loss, verbose=False)
    assert isinstance(err.value.__cause__, ValueError)  # torch's own error, chained
    plan = plan_batch(
        model, _batch, 21, optimizer=opt, loss_fn=_loss, memory_budget=2**26,
        min_micro_batch_size=2, verbose=False,
    )  # fmt: skip
    assert min(plan.micro_batch_sizes()) >= 2
    assert sum(plan.micro_batch_sizes()) == 21
    # The plan's micro-batches train through the wrapper (the last one included).
    wrapped = fastaccum.wrap(opt, plan.accum_steps, model=model)
    for n in plan.micro_batch_sizes():
        x, y = _batch(n)
        wrapped.backward(_loss(model, (x, y)), num_items=n)
        stepped = wrapped.step()
    assert stepped


def test_split_keeps_every_micro_batch_at_least_the_smallest():
    assert _split(10, 3) == (3, 4, 1)
    assert _split(10, 3, 2) == (2, 5, 2)
    assert _split(21, 8, 2) == (7, 3, 7)
    assert _split(10, 3, 3) is None  # 3 + 3 + 3 + 1 and 3 + 3 + 4 are both out
    for target in range(1, 40):
        for largest in range(1, target + 1):
            for smallest in range(1, largest + 1):
                split = _split(target, largest, smallest)
                if split is None:
                    continue
                micro, k, last = split
                assert micro * (k - 1) + last == target
                assert smallest <= last <= micro <= largest
                assert k == math.ceil(target / largest) or smallest > 1


def test_make_batch_that_ignores_n_is_refused():
    model = _mlp()
    with pytest.raises(ValueError, match=r"make_batch\(1\) returned tensors of shapes \[8, 16\]"):
        plan_batch(model, lambda n: _batch(8), 32, loss_fn=_loss, verbose=False)


def test_a_probe_that_raises_names_the_micro_batch_and_chains_the_error():
    def loss_fn(model, batch):
        raise KeyError("labels")

    with pytest.raises(PlanningError, match=r"micro-batch 1 raised KeyError") as err:
        plan_batch(_mlp(), _batch, 8, loss_fn=loss_fn, verbose=False)
    assert isinstance(err.value.__cause__, KeyError)


def test_dict_batches_go_to_the_model_as_keywords():
    class Keyword(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _mlp()

        def forward(self, inputs, labels):
            return torch.nn.functional.cross_entropy(self.body(inputs), labels)

    def make(n, size=None):
        x, y = _batch(n if size is None else size)
        return UserDict(inputs=x, labels=y)  # a mapping that is no dict, as BatchEncoding

    plan = plan_batch(Keyword(), make, 16, memory_budget=2**26, verbose=False)
    assert plan.effective_batch_size == 16
    with pytest.raises(ValueError, match=r"make_batch\(1\) returned tensors of shapes \[8, 16\]"):
        plan_batch(Keyword(), lambda n: make(n, 8), 16, verbose=False)


def _frozen() -> torch.nn.Module:
    model = _mlp()
    model.requires_grad_(False)
    return model


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"memory_budget": math.inf}, ValueError, "positive, finite number of bytes"),
        ({"memory_budget": "1GB"}, TypeError, "memory_budget must be a number of bytes"),
        ({"memory_budget": True}, TypeError, "got bool"),
        ({"model": lambda x: x}, TypeError, r"model must be a torch\.nn\.Module"),
        ({"make_batch": 3}, TypeError, "make_batch must be callable"),
        ({"optimizer": "adam"}, TypeError, r"optimizer must be a torch\.optim\.Optimizer"),
        ({"policy": "8bit"}, TypeError, r"policy must be a fastaccum\.ActivationPolicy"),
        ({"model": _frozen()}, ValueError, "no parameter of the model requires grad"),
        ({"min_micro_batch_size": 0}, ValueError, "min_micro_batch_size must be in"),
        ({"min_micro_batch_size": 9}, ValueError, "min_micro_batch_size must be in"),
        ({"headroom": "0.1"}, TypeError, "headroom must be a float"),
    ],
)
def test_bad_arguments_are_refused_before_any_probe(change, error, match):
    args = {"model": _mlp(), "make_batch": _batch, "target_batch_size": 8, "loss_fn": _loss}
    args.update(change)
    with pytest.raises(error, match=match):
        plan_batch(verbose=False, **args)


def test_numpy_integers_are_sizes_and_a_tiny_budget_says_it_is_in_bytes():
    np = pytest.importorskip("numpy")
    plan = plan_batch(
        _mlp(), _batch, np.int64(8), loss_fn=_loss, memory_budget=2**26, verbose=False
    )
    assert plan.effective_batch_size == 8
    with pytest.raises(PlanningError, match=r"memory_budget is in bytes: 2 was given"):
        plan_batch(_mlp(), _batch, 8, loss_fn=_loss, memory_budget=2, verbose=False)
