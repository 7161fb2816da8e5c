"""Mid-window checkpoints of models with AccumBatchNorm: the window statistics (kept out of
``model.state_dict()`` so its keys stay nn.BatchNorm's) travel in the wrapper's state dict,
and a resumed run is bit-identical to an uninterrupted one in every mode."""

import warnings

import pytest
import torch

import fastaccum
from fastaccum.nn import load_window_state_dict, window_state_dict
from tests.helpers import resume

K = 4
MODES = [("merged", {}), ("renorm", {"plain_windows": 0, "warmup_windows": 1}), ("window", {})]


def make_cnn(seed: int, mode: str, options: dict, track: bool = True, channels: int = 4):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, channels, 3),
        torch.nn.BatchNorm2d(channels, track_running_stats=track),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(channels * 16, 3),
    )
    return fastaccum.convert_batchnorm(model, mode, **options)


def batches(n: int = 13) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    # Shifted inputs, so the window statistics are far from the running ones.
    return [
        (torch.randn(2, 2, 6, 6, generator=gen) * 2 + 1, torch.randint(0, 3, (2,), generator=gen))
        for _ in range(n)
    ]


def train(mode, options, stop_at=None, track=True, backward=False, fused=False):
    """K=4 windows of micro-batch 2 through ``wrap(AdamW, model=model)`` (or the fused
    AdamW), checkpointed and resumed into a differently initialized model before micro-batch
    ``stop_at``."""

    def build(seed=0):
        model = make_cnn(seed, mode, options, track)
        if fused:
            opt = fastaccum.optim.AdamW(model.parameters(), lr=1e-2, accum_steps=K, model=model)
        else:
            opt = fastaccum.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), K, model=model)
        return model, opt

    model, opt = build()
    for i, (x, y) in enumerate(batches()):
        if i == stop_at:
            model, opt = resume(model, opt, lambda: build(seed=99))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if backward:
            opt.backward(loss)
        else:
            loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def assert_same_run(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    for x, y in zip(window_state_dict(a), window_state_dict(b), strict=True):
        for key in x:
            assert torch.equal(torch.as_tensor(x[key]), torch.as_tensor(y[key])), key


@pytest.mark.parametrize("mode,options", MODES, ids=[m for m, _ in MODES])
@pytest.mark.parametrize("stop_at", [6, 9])
def test_mid_window_resume_is_bit_identical(mode, options, stop_at):
    """Parameters, running statistics and the open window (13 micro-batches: three windows
    and one more) equal the uninterrupted run's, for a checkpoint two or one micro-batches
    into a window."""
    want, _ = train(mode, options)
    got, _ = train(mode, options, stop_at=stop_at)
    assert_same_run(got, want)


@pytest.mark.parametrize("fused", [False, True], ids=["wrap", "fused"])
def test_mid_window_resume_under_opt_backward(fused):
    want, _ = train("window", {}, backward=True, fused=fused)
    got, _ = train("window", {}, stop_at=6, backward=True, fused=fused)
    assert_same_run(got, want)


def test_renorm_schedule_without_running_statistics_resumes():
    """Without running statistics the completed-window count lives only in the window
    state; it resumes with it, whichever of model and optimizer is loaded first."""
    options = {"plain_windows": 1, "warmup_windows": 4}
    want, _ = train("renorm", options, track=False)
    got, _ = train("renorm", options, stop_at=9, track=False)
    assert_same_run(got, want)
    model, opt = train("renorm", options, stop_at=None, track=False)
    assert window_state_dict(model)[0]["windows_done"] == 3
    fresh = make_cnn(1, "renorm", options, track=False)
    reopt = fastaccum.wrap(torch.optim.AdamW(fresh.parameters()), K, model=fresh)
    reopt.load_state_dict(opt.state_dict())
    fresh.load_state_dict(model.state_dict())  # loaded second: keeps the window count
    assert window_state_dict(fresh)[0]["windows_done"] == 3


def test_state_dict_holds_copies():
    model, opt = train("merged", {}, stop_at=None)
    saved = opt.state_dict()["fastaccum"]["batchnorm"][0]
    before = saved["window_mean"].clone()
    model(batches(1)[0][0])
    assert torch.equal(saved["window_mean"], before)
    assert saved["window_count"] == 2 * 16 and model[1].window_count == 4 * 16  # samples x 4x4


def test_another_channel_count_is_refused_and_nothing_changes():
    _, opt = train("merged", {})
    state = opt.state_dict()
    wider = make_cnn(0, "merged", {}, channels=5)
    state["fastaccum"]["batchnorm"][0] = wider[1].window_state_dict()
    model = make_cnn(3, "merged", {})
    other = fastaccum.wrap(torch.optim.AdamW(model.parameters()), K, model=model)
    x, y = batches(1)[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    other.step()
    accums = {p: a.clone() for p, a in other._accums.items()}
    window = window_state_dict(model)
    with pytest.raises(ValueError, match="5 channels, but the module has 4"):
        other.load_state_dict(state)
    assert other.micro_step == 1
    assert all(torch.equal(other._accums[p], a) for p, a in accums.items())
    assert torch.equal(window_state_dict(model)[0]["window_mean"], window[0]["window_mean"])
    assert not other.optimizer.state  # the inner optimizer was not loaded either


def test_window_states_need_a_model_to_load_into():
    _, opt = train("merged", {})
    model = make_cnn(3, "merged", {})
    bare = fastaccum.wrap(torch.optim.AdamW(model.parameters()), K)
    with pytest.raises(ValueError, match="no model="):
        bare.load_state_dict(opt.state_dict())
    assert bare.micro_step == 0


def test_checkpoint_without_window_states_warns_and_starts_the_window_empty():
    """A mid-window checkpoint saved without model= (or by an older version) cannot restore
    the window statistics: the window restarts empty, with a warning."""
    model = make_cnn(0, "merged", {})
    bare = fastaccum.wrap(torch.optim.AdamW(model.parameters()), K)
    for x, y in batches(2):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        bare.step()
    fresh = make_cnn(1, "merged", {})
    fresh(batches(1)[0][0])  # a stale window in the module before loading
    opt = fastaccum.wrap(torch.optim.AdamW(fresh.parameters()), K, model=fresh)
    with pytest.warns(RuntimeWarning, match="without AccumBatchNorm window statistics"):
        opt.load_state_dict(bare.state_dict())
    assert fresh[1].window_count == 0 and opt.micro_step == 2
    empty = fastaccum.wrap(torch.optim.AdamW(model.parameters()), K)  # saved at micro-step 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(empty.state_dict())


def test_module_functions_round_trip_and_refuse_bad_states():
    model = make_cnn(0, "window", {})
    for x, _ in batches(3):
        model(x)
    states = window_state_dict(model)
    fresh = make_cnn(1, "window", {})
    load_window_state_dict(fresh, states)
    assert_same_run(fresh[1:2], model[1:2])
    with pytest.raises(ValueError, match="for 2 module"):
        load_window_state_dict(fresh, states * 2)
    with pytest.raises(ValueError, match="not an AccumBatchNorm window state"):
        load_window_state_dict(fresh, [{"window_mean": states[0]["window_mean"]}])
    bad = dict(states[0], window_count=-1)
    with pytest.raises(ValueError, match="window_count should be an int >= 0"):
        load_window_state_dict(fresh, [bad])
    bad = dict(states[0], prev_grad=torch.zeros(4))
    with pytest.raises(ValueError, match=r"prev_grad should be a tensor of shape \(2, 4\)"):
        fresh[1].load_window_state_dict(bad)
