"""AccumBatchNorm (merged mode): running statistics equal one large batch's, computed in
float64 from the same data, across micro-batches of different sizes."""

import pytest
import torch

import fastaccum
from fastaccum.nn import AccumBatchNorm1d, AccumBatchNorm2d, convert_batchnorm, end_window
from tests.helpers import assert_close_rel

SIZES = [2, 5, 1, 7, 3]


def micro_batches(mean=0.0, std=1.0, seed=0, shape=(6, 4, 5)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=gen) * std + mean for n in SIZES]


def expected_running(xs, init_mean, init_var, momentum):
    """float64 truth: one running-statistics update from the whole window's samples."""
    x = torch.cat(xs).double()
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims)
    var = x.var(dims, correction=1)
    return (1 - momentum) * init_mean + momentum * mean, (1 - momentum) * init_var + momentum * var


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (1e4, 1.0)])
def test_merged_running_stats_match_one_large_batch(mean, std):
    xs = micro_batches(mean, std)
    bn = AccumBatchNorm2d(6, momentum=0.1)
    for x in xs:
        bn(x)
    assert bn.num_batches_tracked.item() == 0  # nothing folded before the window ends
    end_window(bn)
    want_mean, want_var = expected_running(xs, torch.zeros(6).double(), torch.ones(6).double(), 0.1)
    assert_close_rel(bn.running_mean, want_mean, 1e-6)
    assert_close_rel(bn.running_var, want_var, 1e-6)
    assert bn.num_batches_tracked.item() == 1


def test_native_batchnorm_does_not_match_under_accumulation():
    """The problem being solved: nn.BatchNorm fed the same micro-batches drifts away."""
    xs = micro_batches(seed=1)
    bn = torch.nn.BatchNorm2d(6, momentum=0.1)
    for x in xs:
        bn(x)
    want_mean, _ = expected_running(xs, torch.zeros(6).double(), torch.ones(6).double(), 0.1)
    rel = (bn.running_mean.double() - want_mean).norm() / want_mean.norm()
    assert rel > 1e-2


def test_cumulative_average_when_momentum_is_none():
    windows = [micro_batches(seed=s) for s in (2, 3)]
    bn = AccumBatchNorm2d(6, momentum=None)
    stats = []
    for xs in windows:
        for x in xs:
            bn(x)
        end_window(bn)
        x = torch.cat(xs).double()
        stats.append((x.mean((0, 2, 3)), x.var((0, 2, 3), correction=1)))
    assert_close_rel(bn.running_mean, (stats[0][0] + stats[1][0]) / 2, 1e-6)
    assert_close_rel(bn.running_var, (stats[0][1] + stats[1][1]) / 2, 1e-6)


def test_training_output_is_batchnorm_output():
    x = micro_batches(seed=4)[3]
    bn, ref = AccumBatchNorm2d(6), torch.nn.BatchNorm2d(6)
    torch.nn.init.normal_(bn.weight)
    ref.load_state_dict(bn.state_dict())
    assert_close_rel(bn(x), ref(x), 1e-6)


def test_1d_with_sequence_dimension():
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(n, 3, 9, generator=gen) for n in SIZES]
    bn = AccumBatchNorm1d(3)
    for x in xs:
        bn(x)
    end_window(bn)
    want_mean, want_var = expected_running(xs, torch.zeros(3).double(), torch.ones(3).double(), 0.1)
    assert_close_rel(bn.running_mean, want_mean, 1e-6)
    assert_close_rel(bn.running_var, want_var, 1e-6)


def cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 4 * 4, 2),
    )


def test_conversion_round_trips_state_dict_and_keeps_eval_outputs():
    model = cnn()
    for _ in range(3):  # give it non-trivial running statistics
        model(torch.randn(4, 3, 6, 6))
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    keys = list(model.state_dict())
    convert_batchnorm(model)
    assert type(model[1]) is AccumBatchNorm2d
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), before)
    plain = cnn(seed=1)
    plain.load_state_dict(model.state_dict())  # and back into plain nn.BatchNorm
    plain.eval()
    assert torch.equal(plain(x), before)


def test_checkpoint_recomputation_is_not_counted_twice():
    from torch.utils.checkpoint import checkpoint

    counts = []
    for ckpt in (False, True):
        model = convert_batchnorm(cnn())
        x = torch.randn(5, 3, 6, 6, requires_grad=True)
        out = checkpoint(model, x, use_reentrant=False) if ckpt else model(x)
        out.sum().backward()
        counts.append((model[1].window_count, model[1].window_mean.clone()))
    assert counts[0][0] == counts[1][0] == 5 * 4 * 4
    assert torch.equal(counts[0][1], counts[1][1])


def test_wrapper_closes_the_window_at_each_boundary():
    model = convert_batchnorm(cnn())
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.0), len(SIZES), model=model)
    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(n, 3, 6, 6, generator=gen) for n in SIZES]
    conv_outs = []
    for x in xs:
        with torch.no_grad():
            conv_outs.append(model[0](x))
        model(x).sum().backward()
        opt.step()
    assert model[1].num_batches_tracked.item() == 1
    want_mean, want_var = expected_running(
        conv_outs, torch.zeros(6).double(), torch.ones(6).double(), 0.1
    )
    assert_close_rel(model[1].running_mean, want_mean, 1e-6)
    assert_close_rel(model[1].running_var, want_var, 1e-6)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        AccumBatchNorm2d(4, mode="average")
    with pytest.raises(ValueError, match="mode must be one of"):
        convert_batchnorm(cnn(), mode="average")
