"""Triton weight-gradient accumulation (fastaccum/triton/wgrad.py) against float64 truth.

Without a GPU the kernel runs on CPU tensors under the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported), with fixed tiles. What the interpreter
cannot show, the kernel compiled for sm_80/sm_90 (tensor-core instructions, asynchronous
copies), is checked in a subprocess without it, which needs no GPU.
"""

import json

import pytest
import torch

pytest.importorskip("triton")

from fastaccum import _backend
from fastaccum.triton import wgrad as tri
from tests.helpers import assert_close_rel
from tests.triton.test_accumulate import run_without_interpreter

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = _backend.triton_interpreted()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Norm-wise relative error against float64 math on the same (already rounded) inputs.
# bf16/fp16 products are exact in fp32, so every dtype sees only fp32 summation error
# (~1e-7 here). The low-precision bound leaves room for the order and truncation of the
# tensor cores' fp32 accumulation, and still fails a sum rounded to fp16 (~3e-4) or bf16.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def expected(accum, grad_out, input, alpha, bias_accum=None):
    """float64 truth: ``accum + alpha * grad_out^T @ input`` and the bias sum."""
    go = grad_out.double()
    want = accum.double() + alpha * (go.t() @ input.double())
    want_bias = None if bias_accum is None else bias_accum.double() + alpha * go.sum(0)
    return want, want_bias


def layout(t, kind):
    """The same values as ``t`` (2-D) in another memory layout."""
    if kind == "contiguous":
        return t
    if kind == "transposed":  # column-major: stride (1, rows)
        return t.t().contiguous().t()
    if kind == "strided":  # every other column of a wider buffer
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        wide[:, ::2] = t
        return wide[:, ::2]
    if kind == "expanded":  # one row repeated: stride (0, 1)
        return t[:1].expand(t.shape[0], -1)
    raise ValueError(kind)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 7, 129])
@pytest.mark.parametrize("n", [1, 3, 65, 130])
@pytest.mark.parametrize("k", [1, 3, 65, 130])
def test_matches_float64(dtype, m, n, k):
    """Odd shapes: partial tiles in every dimension, several tiles along N, K and M."""
    grad_out, input = randn(m, n, dtype=dtype, seed=1), randn(m, k, dtype=dtype, seed=2)
    accum, bias = randn(n, k, seed=3), randn(n, seed=4)
    want, want_bias = expected(accum, grad_out, input, 0.37, bias)

    tri.wgrad_accumulate_triton(accum, grad_out, input, 0.37, bias)

    assert accum.dtype == torch.float32 and accum.shape == (n, k)
    assert_close_rel(accum, want, RTOL[dtype])
    # With K = 130, three column tiles: the bias must be added once, not once per tile.
    assert_close_rel(bias, want_bias, RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("go_layout", ["contiguous", "transposed", "strided", "expanded"])
@pytest.mark.parametrize("in_layout", ["contiguous", "transposed", "strided", "expanded"])
def test_non_contiguous_inputs(dtype, go_layout, in_layout):
    grad_out = layout(randn(37, 70, dtype=dtype, seed=1), go_layout)
    input = layout(randn(37, 66, dtype=dtype, seed=2), in_layout)
    accum, bias = randn(70, 66, seed=3), randn(70, seed=4)
    want, want_bias = expected(accum, grad_out, input, -1.5, bias)

    tri.wgrad_accumulate_triton(accum, grad_out, input, -1.5, bias)

    assert_close_rel(accum, want, RTOL[dtype])
    assert_close_rel(bias, want_bias, RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_bias(dtype):
    grad_out, input = randn(129, 130, dtype=dtype, seed=1), randn(129, 65, dtype=dtype, seed=2)
    accum = randn(130, 65, seed=3)
    want, _ = expected(accum, grad_out, input, 2.0)
    tri.wgrad_accumulate_triton(accum, grad_out, input, 2.0)
    assert_close_rel(accum, want, RTOL[dtype])


def test_many_row_tiles():
    """N = 600: ten row tiles, so one full group of GROUP_N = 8 and one partial group."""
    grad_out, input = randn(33, 600, dtype=torch.bfloat16, seed=1), randn(33, 130, seed=2)
    input = input.bfloat16()
    accum, bias = randn(600, 130, seed=3), randn(600, seed=4)
    want, want_bias = expected(accum, grad_out, input, 0.5, bias)
    tri.wgrad_accumulate_triton(accum, grad_out, input, 0.5, bias)
    assert_close_rel(accum, want, RTOL[torch.bfloat16])
    assert_close_rel(bias, want_bias, RTOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulates_over_micro_batches(dtype):
    """Variable-length micro-batches, each with its own alpha, into one accumulator."""
    n, k = 65, 130
    accum, bias = torch.zeros(n, k, device=DEVICE), torch.zeros(n, device=DEVICE)
    want, want_bias = accum.double(), bias.double()
    for step, (m, alpha) in enumerate([(5, 0.25), (64, 1.0), (1, -3.0), (129, 1 / 7)]):
        grad_out = randn(m, n, dtype=dtype, seed=10 + step)
        input = randn(m, k, dtype=dtype, seed=20 + step)
        want, want_bias = expected(want, grad_out, input, alpha, want_bias)
        tri.wgrad_accumulate_triton(accum, grad_out, input, alpha, bias)
    assert_close_rel(accum, want, RTOL[dtype])
    assert_close_rel(bias, want_bias, RTOL[dtype])


def test_no_tokens_changes_nothing():
    accum, bias = randn(3, 5, seed=1), randn(3, seed=2)
    before = accum.clone(), bias.clone()
    empty_go, empty_in = torch.empty(0, 3, device=DEVICE), torch.empty(0, 5, device=DEVICE)
    tri.wgrad_accumulate_triton(accum, empty_go, empty_in, 1.0, bias)
    assert torch.equal(accum, before[0]) and torch.equal(bias, before[1])
    # Empty layers: nothing to do, no error.
    tri.wgrad_accumulate_triton(torch.empty(0, 5, device=DEVICE), empty_go[:, :0], empty_in, 1.0)
    tri.wgrad_accumulate_triton(torch.empty(3, 0, device=DEVICE), empty_go, empty_in[:, :0], 1.0)


def test_through_public_wrapper():
    """fastaccum.ops.wgrad.wgrad_accumulate_(backend="triton") routes here and agrees with
    the op family's float64 reference."""
    from fastaccum.ops.wgrad import wgrad_accumulate_, wgrad_accumulate_ref

    grad_out = randn(20, 70, dtype=torch.bfloat16, seed=1)
    input = randn(20, 33, dtype=torch.bfloat16, seed=2)
    accum, bias = randn(70, 33, seed=3), randn(70, seed=4)
    want, want_bias = accum.clone(), bias.clone()
    wgrad_accumulate_ref(want, grad_out, input, 3.0, want_bias)
    wgrad_accumulate_(accum, grad_out, input, 3.0, bias, backend="triton")
    assert_close_rel(accum, want, RTOL[torch.bfloat16])
    assert_close_rel(bias, want_bias, RTOL[torch.bfloat16])


# --------------------------------------------------------------------------- bad input


def _bad_cases():
    go, x = randn(4, 3, seed=1), randn(4, 5, seed=2)
    return [  # (grad_out, input, accum shape or tensor, bias, exception, message)
        (go, x, torch.zeros(5, 3), None, ValueError, r"accum must have shape .*\(3, 5\)"),
        (go, x[:3], torch.zeros(3, 5), None, ValueError, "same number of rows"),
        (go[None], x, torch.zeros(3, 5), None, ValueError, "must be 2-D"),
        (go, x.bfloat16(), torch.zeros(3, 5), None, TypeError, "same dtype"),
        (go.double(), x.double(), torch.zeros(3, 5), None, TypeError, "one of float32"),
        (go, x, torch.zeros(3, 5, dtype=torch.bfloat16), None, TypeError, "accum must be float32"),
        (go, x, torch.zeros(5, 3).t(), None, ValueError, "accum must be contiguous"),
        (go, x, torch.zeros(3, 5), torch.zeros(5), ValueError, r"bias_accum must .*\(3,\)"),
        (go, x, torch.zeros(3, 5), torch.zeros(3).half(), TypeError, "bias_accum must be float32"),
        (go, x, torch.zeros(3, 5), torch.zeros(6)[::2], ValueError, "bias_accum must be contig"),
        (go, x.to("meta"), torch.zeros(3, 5), None, ValueError, "one device"),
        (go, x, torch.zeros(3, 5), torch.zeros(3, device="meta"), ValueError, "one device"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_is_rejected_before_any_write(case):
    grad_out, input, accum, bias, error, message = _bad_cases()[case]
    accum = accum.to(DEVICE).fill_(7.0)  # any write would show
    before = accum.clone()
    bias_before = None if bias is None else bias.clone()
    with pytest.raises(error, match=message):
        tri.wgrad_accumulate_triton(accum, grad_out, input, 1.0, bias)
    assert torch.equal(accum, before)
    if bias is not None and bias.device.type != "meta":
        assert torch.equal(bias, bias_before)


@pytest.mark.parametrize("alpha", [True, "1.0", None])
def test_alpha_must_be_a_number(alpha):
    accum = torch.zeros(3, 5, device=DEVICE)
    with pytest.raises((TypeError, RuntimeError), match=r"alpha|float"):
        tri.wgrad_accumulate_triton(accum, randn(4, 3), randn(4, 5), alpha)
    assert torch.count_nonzero(accum).item() == 0


def test_device_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_backend, "triton_can_run", lambda device: False)
    with pytest.raises(RuntimeError, match="cannot run on"):
        tri.wgrad_accumulate_triton(torch.zeros(3, 5), randn(4, 3), randn(4, 5), 1.0)


def test_meta_tensors_are_checked_but_not_run():
    go, x = torch.empty(4, 3, device="meta"), torch.empty(4, 5, device="meta")
    tri.wgrad_accumulate_triton(torch.empty(3, 5, device="meta"), go, x, 1.0)
    with pytest.raises(ValueError, match="accum must have shape"):
        tri.wgrad_accumulate_triton(torch.empty(5, 3, device="meta"), go, x, 1.0)


# --------------------------------------------------------------------------- torch.library


# As in test_accumulate: the interpreter runs no traced tensors, so the aot_dispatch checks
# need a GPU.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")
if not INTERPRETED:
    OPCHECK_UTILS += ("test_aot_dispatch_dynamic",)


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(with_bias):
    grad_out, input = randn(9, 70, dtype=torch.bfloat16), randn(9, 3, dtype=torch.bfloat16)
    bias = randn(70, seed=4) if with_bias else None
    torch.library.opcheck(
        torch.ops.fastaccum.wgrad_accumulate_triton_.default,
        (randn(70, 3, seed=3), grad_out.t().contiguous().t(), input, 0.5, bias),
        test_utils=OPCHECK_UTILS,
    )


def two_micro_batches(accum, bias, batches):
    for grad_out, input in batches:
        tri.wgrad_accumulate_triton(accum, grad_out, input, 0.5, bias)
    return accum.sum()


def test_compile_fullgraph():
    """One graph, no breaks. Without a GPU, backend='eager' (dynamo capture, the op as one
    node, checked with its fake kernel); lowering needs real Triton."""
    batches = [(randn(5, 70, seed=i), randn(5, 3, seed=10 + i)) for i in range(2)]
    accum, bias = randn(70, 3, seed=3), randn(70, seed=4)
    args = accum.clone(), bias.clone()
    want = two_micro_batches(*args, batches)

    torch._dynamo.reset()
    backend = "eager" if INTERPRETED else "inductor"
    got = torch.compile(two_micro_batches, backend=backend, fullgraph=True)(accum, bias, batches)
    torch._dynamo.reset()

    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(accum, args[0]) and torch.equal(bias, args[1])


def test_kernel_compiles_for_gpus():
    """Compiled for real (no interpreter, no GPU needed): bf16/fp16 run on the tensor cores
    (wgmma on sm_90, mma on sm_80) with asynchronous copies, fp32 stays off them (no TF32),
    transposed operands compile too, and on a GPU the kernel is autotuned with accum and
    (when there is one) bias restored after each trial."""
    out = run_without_interpreter(
        """
        import json
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from fastaccum.triton import wgrad

        fn = wgrad._wgrad_accumulate_kernel
        config = wgrad._gpu_configs()[1]

        def ptx(dtype, bias, arch, ones=("stride_go_n", "stride_in_k")):
            # PTX of a launch whose int arguments named in `ones` are 1 (Triton makes them
            # constants) and whose other ints and pointers are multiples of 16.
            sig = {"accum_ptr": "*fp32", "grad_out_ptr": "*" + dtype, "input_ptr": "*" + dtype,
                   "bias_ptr": "*fp32" if bias else "constexpr", "M": "i32", "N": "i32",
                   "K": "i32", "M_BUCKET": "i32", "stride_go_m": "i32", "stride_go_n": "i32",
                   "stride_in_m": "i32", "stride_in_k": "i32", "alpha": "fp32"}
            consts = {"DOT_IN_FP32": dtype == "fp32", **config.kwargs}
            consts.update({name: 1 for name in ones})
            if not bias:
                consts["bias_ptr"] = None
            sig.update({name: "constexpr" for name in consts})
            aligned = [a for a, s in sig.items() if s != "constexpr" and a != "alpha"]
            attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
            src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            code = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            text = code.asm["ptx"]
            return ["wgmma" in text, "mma.sync" in text, "cp.async" in text]

        tuners = wgrad._wgrad_with_bias, wgrad._wgrad_without_bias
        print(json.dumps({
            "sm90_bf16_bias": ptx("bf16", True, 90),
            "sm90_fp32": ptx("fp32", False, 90),
            "sm80_fp16": ptx("fp16", False, 80),
            # Both operands transposed (unit stride along M) and a one-row layer.
            "sm90_transposed": ptx("bf16", True, 90, ones=("N", "stride_go_m", "stride_in_m")),
            "autotuners": [[type(t).__name__, t.keys, t.restore_value] for t in tuners],
        }))
        """
    )
    found = json.loads(out)
    assert found["sm90_bf16_bias"] == [True, False, True]
    assert found["sm90_fp32"] == [False, False, True]
    assert found["sm80_fp16"] == [False, True, True]
    assert found["sm90_transposed"][0]
    # Without a bias, bias_ptr is None and must not be restored (Triton 3.6 would clone it).
    assert found["autotuners"] == [
        ["Autotuner", ["M_BUCKET", "N", "K"], ["accum_ptr", "bias_ptr"]],
        ["Autotuner", ["M_BUCKET", "N", "K"], ["accum_ptr"]],
    ]
