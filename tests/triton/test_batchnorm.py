"""Triton batch-norm kernels (fastaccum/triton/batchnorm.py) against float64 truth.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported), so shapes are small. Inputs, truths and
tolerances come from tests/ops/test_batchnorm.py.
"""

import json

import pytest
import torch

pytest.importorskip("triton")

import fastaccum.triton.batchnorm  # noqa: F401  (registers the fastaccum::bn_*_triton ops)
from fastaccum import _backend
from fastaccum.ops import batchnorm as bn
from tests.helpers import assert_close_rel
from tests.ops.test_batchnorm import (
    DTYPES,
    EPS,
    LAYOUTS,
    TRAIN_RTOL,
    Y_RTOL,
    assert_same_layout,
    assert_stats_close,
    assert_sums_close,
    case_inputs,
    make_grad,
    make_params,
    make_x,
    over_cases,
    per_channel,
    renorm_float64,
    run_train,
    torch_float64,
    train_inputs,
    truth_apply,
    truth_grad_input,
    truth_grad_sums,
    truth_stats,
)
from tests.triton.test_accumulate import compile_for_gpus

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = _backend.triton_interpreted()
# Odd sizes; (3, 2, 1000) makes reduction programs whose ranges cross plane boundaries.
SHAPES = [(1, 3), (7, 5), (5, 4, 1, 1), (3, 2, 1000), (2, 5, 3, 7), (2, 3, 2, 3, 5)]
ops = torch.ops.fastaccum


def on_device(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


@pytest.mark.parametrize("shape", [*SHAPES, (1, 2, 5000), (700, 3), (3, 130, 7)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_stats_matches_float64(shape, layout):
    x = make_x(shape, layout=layout, mean=0.5, std=2.0).to(DEVICE)
    assert_stats_close([t.cpu() for t in ops.bn_stats_triton(x)], x.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("std", [1.0, 100.0])
def test_stats_large_mean(dtype, layout, std):
    x = make_x((4, 3, 9, 7), dtype, layout, mean=1e4, std=std, seed=3).to(DEVICE)
    assert_stats_close([t.cpu() for t in ops.bn_stats_triton(x)], x.cpu())


@over_cases(SHAPES)
def test_apply_matches_float64(shape, dtype, layout, relu):
    x, mean, invstd, weight, bias, _ = case_inputs(shape, dtype, layout)
    y = ops.bn_apply_triton(*on_device(x, mean, invstd, weight, bias), relu)
    assert y.dtype == dtype and y.shape == x.shape and y.device.type == DEVICE.type
    assert_same_layout(y, x)
    # Same fp32 expression as the reference; bf16 as well on a GPU (the interpreter's
    # fp32 -> bf16 cast truncates, triton 3.9).
    assert_close_rel(y.cpu(), truth_apply(x, mean, invstd, weight, bias, relu), Y_RTOL[dtype])


@over_cases(SHAPES)
def test_backward_matches_float64(shape, dtype, layout, relu):
    x, mean, invstd, weight, bias, grad = case_inputs(shape, dtype, layout)
    args = on_device(grad, x, mean, invstd, weight, bias)
    sums = ops.bn_backward_reduce_triton(*args, relu)
    want = truth_grad_sums(grad, x, mean, invstd, weight, bias, relu)
    assert_sums_close([s.cpu() for s in sums], want)

    count = x.numel() // x.shape[1]
    gx = ops.bn_backward_apply_triton(*args, *sums, count, relu)
    assert gx.dtype == dtype
    assert_same_layout(gx, x)
    sums = [s.cpu() for s in sums]
    want = truth_grad_input(grad, x, mean, invstd, weight, bias, *sums, count, relu)
    assert_close_rel(gx.cpu(), want, Y_RTOL[dtype])


def test_no_affine_and_gradient_in_another_layout():
    x = make_x((3, 6, 4, 5), torch.bfloat16, "channels_last")
    mean, invstd, _, _ = make_params(x)
    grad = make_grad(x, mean, invstd, None, None).contiguous()
    args = on_device(grad, x, mean, invstd, None, None)
    sums = ops.bn_backward_reduce_triton(*args, True)
    assert_sums_close(
        [s.cpu() for s in sums], truth_grad_sums(grad, x, mean, invstd, None, None, True)
    )
    gx = ops.bn_backward_apply_triton(*args, *sums, 60, True)
    assert_same_layout(gx, x)
    sums = [s.cpu() for s in sums]
    want = truth_grad_input(grad, x, mean, invstd, None, None, *sums, 60, True)
    assert_close_rel(gx.cpu(), want, Y_RTOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
def test_train_through_public_wrapper(dtype, relu):
    """batch_norm_train(backend="triton"): y and grads vs float64 autograd of F.batch_norm."""
    x, weight, bias = train_inputs((4, 3, 5, 6), dtype, "channels_last")
    with torch.no_grad():
        m, m2 = truth_stats(x)
        invstd = torch.rsqrt(m2 / (x.numel() // 3) + EPS)
    grad = make_grad(x, m.float(), invstd.float(), weight, bias)
    want = torch_float64(x, weight, bias, relu, grad)
    got = run_train(*on_device(x, weight, bias), relu, "triton", grad=grad.to(DEVICE))
    for g, w in zip(got, want, strict=True):
        assert_close_rel(g.cpu(), w, TRAIN_RTOL[dtype])


def test_train_renorm_through_public_wrapper():
    x, weight, bias = train_inputs((5, 4, 3, 3), torch.float32, "contiguous", seed=2)
    scale, offset = per_channel(4, 3, low=0.8, high=1.2), per_channel(4, 4, low=-0.3, high=0.3)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    want = renorm_float64(x, weight, bias, scale, offset, False, grad)
    got = run_train(
        *on_device(x, weight, bias), False, "triton",
        scale=scale.to(DEVICE), offset=offset.to(DEVICE), grad=grad.to(DEVICE),
    )  # fmt: skip
    for g, w in zip(got, want, strict=True):
        assert_close_rel(g.cpu(), w, 2e-5)


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_rejected_before_launch():
    x = make_x((4, 3, 5)).to(DEVICE)
    mean, invstd = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        ops.bn_apply_triton(x, mean, invstd, torch.ones(2, device=DEVICE), None, False)
    with pytest.raises(TypeError, match="expected one of float32"):
        ops.bn_stats_triton(x.to(torch.int32))
    with pytest.raises(ValueError, match="no elements per channel"):
        ops.bn_stats_triton(x[:0])
    with pytest.raises(ValueError, match="grad_y"):
        ops.bn_backward_reduce_triton(x[:1], x, mean, invstd, None, None, False)


def test_device_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_backend, "triton_can_run", lambda device: False)
    with pytest.raises(RuntimeError, match="cannot run on"):
        ops.bn_stats_triton(make_x((4, 3)).to(DEVICE))


def test_meta_tensors_get_shapes_only():
    x = torch.empty(2, 3, 4, 5, device="meta").to(memory_format=torch.channels_last)
    mean, invstd = torch.empty(3, device="meta"), torch.empty(3, device="meta")
    stats = ops.bn_stats_triton(x)
    assert [tuple(t.shape) for t in stats] == [(3,), (3,)] and stats[0].is_meta
    y = ops.bn_apply_triton(x, mean, invstd, None, None, True)
    assert y.is_meta and y.shape == x.shape and bn.is_channels_last_like(y)


# --------------------------------------------------------------------------- torch.library

# As in tests/triton/test_accumulate.py: the interpreter runs no traced tensors, so the
# aot_dispatch check needs a GPU.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")
if not INTERPRETED:
    OPCHECK_UTILS += ("test_aot_dispatch_dynamic",)


def test_opcheck():
    x = make_x((3, 4, 5, 2), torch.bfloat16, "channels_last")
    mean, invstd, weight, bias = make_params(x)
    grad = make_grad(x, mean, invstd, weight, bias)
    args = on_device(grad, x, mean, invstd, weight, bias)
    sums = ops.bn_backward_reduce_triton(*args, True)
    samples = [
        (ops.bn_stats_triton, (args[1],)),
        (ops.bn_apply_triton, (*args[1:], True)),
        (ops.bn_backward_reduce_triton, (*args, True)),
        (ops.bn_backward_apply_triton, (*args, *sums, 30, True)),
    ]
    for op, sample in samples:
        torch.library.opcheck(op.default, sample, test_utils=OPCHECK_UTILS)


def test_kernels_compile_for_gpus():
    """Every kernel compiles for sm_80 and sm_90 (no GPU needed), with 32- and 64-bit sizes;
    the interpreter is more lenient about types than the compiler."""
    out = compile_for_gpus(
        """
        import json
        from fastaccum.triton import batchnorm as tb

        compiled = 0
        for arch in (80, 90):
            for size in ("i32", "i64"):
                for block_s, block_c in ((256, 4), (8, 128)):
                    geo = {k: size for k in ("C", "S", "SP", "SC", "SS")}
                    blocks = {"BLOCK_S": block_s, "BLOCK_C": block_c}
                    x = "*bf16"
                    f32 = "*fp32"
                    kernels = [
                        (tb._stats_partial_kernel, {
                            "x_ptr": x, "shift_ptr": f32, "mean_part": f32, "m2_part": f32,
                            "count_part": f32, **geo, "pairs": size, "pairs_per_split": size,
                            **blocks}),
                        (tb._grad_sums_partial_kernel, {
                            "dy_ptr": x, "x_ptr": x, "mean_ptr": f32, "mul_ptr": f32,
                            "add_ptr": f32, "sum_dy_part": f32, "sum_dy_xmu_part": f32, **geo,
                            "pairs": size, "pairs_per_split": size, "RELU": True, **blocks}),
                        (tb._apply_kernel, {
                            "x_ptr": x, "y_ptr": x, "mean_ptr": f32, "mul_ptr": f32,
                            "add_ptr": f32, **geo, "n_sb": size, "n_cb": size, "RELU": True,
                            **blocks}),
                        (tb._grad_input_kernel, {
                            "dy_ptr": x, "x_ptr": x, "gx_ptr": x, "mean_ptr": f32, "mul_ptr": f32,
                            "add_ptr": f32, "mean_dy_ptr": f32, "k_ptr": f32, **geo,
                            "n_sb": size, "n_cb": size, "RELU": True, **blocks}),
                    ]
                    for fn, args in kernels:
                        # Keep the kernels' own argument order.
                        names = fn.arg_names
                        ptx(fn, {k: args[k] for k in names}, arch)
                        compiled += 1
        print(json.dumps(compiled))
        """
    )
    assert json.loads(out) == 2 * 2 * 2 * 4
