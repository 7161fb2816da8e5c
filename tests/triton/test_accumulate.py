"""Triton accumulate_/finalize_ (fastaccum/triton/accumulate.py) against float64 truth.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported). Two things the interpreter cannot show
run in a subprocess without it: the graph torch.compile traces, and the kernels compiled
for sm_80/sm_90 (which needs no GPU).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

import fastaccum
from fastaccum import _backend
from fastaccum.ops import finalize_ref
from fastaccum.triton import accumulate as tri
from tests.helpers import assert_close_rel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = _backend.triton_interpreted()
SIZES = [1, 3, 1023, 65537]
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative error bound of one rounding to each dtype, with margin. The bf16 bound also
# covers the interpreter, whose fp32 -> bf16 cast truncates (triton 3.9) where GPUs round
# to nearest even.
RTOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# fp32 sums of up to 65537 squares: error of order log2(n) * 2**-24.
SUMSQ_RTOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def random_pairs(sizes, grad_dtype, accum_dtype, *, offset=0, seed=0):
    """Random accumulators and gradients on DEVICE. ``offset=1`` makes each a view
    ``buf[1:1 + n]`` of a larger buffer, so that no address is 16-byte aligned."""
    gen = torch.Generator().manual_seed(seed)
    accums, grads = [], []
    for n in sizes:
        a = torch.randn(n + offset, generator=gen).to(accum_dtype).to(DEVICE)
        g = (torch.randn(n + offset, generator=gen) * 3).to(grad_dtype).to(DEVICE)
        accums.append(a[offset : offset + n])
        grads.append(g[offset : offset + n])
    return accums, grads


def expected_accumulate(accums, grads, scale):
    """float64 truth: updated accumulators and per-tensor gradient sums of squares."""
    acc = [a.double() + scale * g.double() for a, g in zip(accums, grads, strict=True)]
    sumsq = torch.stack([g.double().square().sum() for g in grads])
    return acc, sumsq


def clones(tensors):
    return [t.clone() for t in tensors]


def assert_results_equal(left, right):
    for x, y in zip(left, right, strict=True):
        assert torch.equal(x, y), (x, y)


def run_without_interpreter(script: str) -> str:
    """Run ``script`` in a fresh Python with Triton compiling for real (no interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences triton 3.9's notice; the default anyway
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


# ``ptx(fn, args, arch)``: PTX of a @triton.jit kernel for sm_<arch>. ``args`` maps each
# parameter to a type string ("*fp32", "i64", ...) or, for constexprs, to its value.
_PTX_HELPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def ptx(fn, args, arch):
    signature = {k: "constexpr" if not isinstance(v, str) else v for k, v in args.items()}
    constexprs = {k: v for k, v in args.items() if not isinstance(v, str)}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32)).asm["ptx"]
"""


def compile_for_gpus(script: str) -> str:
    """:func:`run_without_interpreter` with ``ptx(fn, args, arch)`` defined for ``script``."""
    return run_without_interpreter(_PTX_HELPER + textwrap.dedent(script))


# --------------------------------------------------------------------------- accumulate


@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("accum_same_dtype", [False, True])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("zero_grads", [False, True])
def test_accumulate_matches_float64(grad_dtype, accum_same_dtype, offset, zero_grads):
    accum_dtype = grad_dtype if accum_same_dtype else torch.float32
    accums, grads = random_pairs(SIZES, grad_dtype, accum_dtype, offset=offset)
    scale = 0.37
    want_acc, want_sumsq = expected_accumulate(accums, grads, scale)
    grads_before = clones(grads)

    grad_sumsq, per_tensor, accum_sumsq, nonfinite = tri.accumulate_triton(
        accums, grads, scale, zero_grads
    )

    for a, w in zip(accums, want_acc, strict=True):
        assert a.dtype == accum_dtype
        assert_close_rel(a, w, RTOL[accum_dtype])
    assert per_tensor.dtype == torch.float32 and per_tensor.shape == (len(SIZES),)
    assert per_tensor.device.type == DEVICE.type
    assert_close_rel(per_tensor, want_sumsq, SUMSQ_RTOL)
    assert grad_sumsq.shape == () and grad_sumsq.dtype == torch.float32
    assert_close_rel(grad_sumsq, want_sumsq.sum(), SUMSQ_RTOL)
    # Of the values stored, as the reference defines it.
    stored_sumsq = sum(a.double().square().sum() for a in accums)
    assert accum_sumsq.shape == () and accum_sumsq.dtype == torch.float32
    assert_close_rel(accum_sumsq, stored_sumsq, SUMSQ_RTOL)
    assert nonfinite.shape == () and nonfinite.dtype == torch.bool and not nonfinite.item()
    for g, before in zip(grads, grads_before, strict=True):
        if zero_grads:
            assert torch.count_nonzero(g).item() == 0
        else:
            assert torch.equal(g, before)
    # Misaligned views take the element-wise-load variant of the kernel.
    assert tri._plan_for(accums, grads).groups[0].aligned == (offset == 0)


def test_accumulate_mixed_dtypes_one_launch_per_dtype_pair():
    pairs = [  # (grad dtype, accum dtype), two tensors of the first pairing
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ]
    sizes = [5, 4099, 1, 300, 20001, 70]
    accums, grads = [], []
    for seed, (n, (grad_dtype, accum_dtype)) in enumerate(zip(sizes, pairs, strict=True)):
        a, g = random_pairs([n], grad_dtype, accum_dtype, seed=seed)
        accums += a
        grads += g
    want_acc, want_sumsq = expected_accumulate(accums, grads, -1.5)

    _, per_tensor, _, _ = tri.accumulate_triton(accums, grads, -1.5, False)

    for a, w, (_, ad) in zip(accums, want_acc, pairs, strict=True):
        assert_close_rel(a, w, RTOL[ad])
    # Results come back in input order, though the work ran grouped by dtype pair.
    assert_close_rel(per_tensor, want_sumsq, SUMSQ_RTOL)
    plan = tri._plan_for(accums, grads)
    assert len(plan.groups) == 5
    assert sorted(len(g.tensor_table) for g in plan.groups) == [1, 1, 1, 1, 2]
    # The tables are cached: the next micro-step with the same buffers builds nothing.
    assert tri._plan_for(accums, grads) is plan


def test_accumulate_empty_list():
    grad_sumsq, per_tensor, accum_sumsq, nonfinite = tri.accumulate_triton([], [], 2.0, True)
    assert grad_sumsq.item() == 0.0 and accum_sumsq.item() == 0.0
    assert per_tensor.shape == (0,) and per_tensor.dtype == torch.float32
    assert nonfinite.dtype == torch.bool and not nonfinite.item()


def test_accumulate_zero_size_tensors():
    accums, grads = random_pairs([0, 7, 0], torch.bfloat16, torch.float32)
    want_acc, want_sumsq = expected_accumulate(accums, grads, 1.0)
    _, per_tensor, _, _ = tri.accumulate_triton(accums, grads, 1.0, True)
    assert per_tensor[0].item() == 0.0 and per_tensor[2].item() == 0.0
    assert_close_rel(per_tensor, want_sumsq, SUMSQ_RTOL)
    assert_close_rel(accums[1], want_acc[1], RTOL[torch.float32])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_accumulate_flags_nonfinite(bad, grad_dtype):
    accums, grads = random_pairs([300, 65537, 5], grad_dtype, torch.float32)
    grads[1][50000] = bad  # in the fourth of five chunks of the second tensor
    want_acc, _ = expected_accumulate(accums, grads, 0.5)

    _, per_tensor, _, nonfinite = tri.accumulate_triton(accums, grads, 0.5, False)

    assert nonfinite.item()
    assert torch.isfinite(per_tensor[0]) and torch.isfinite(per_tensor[2])
    assert not torch.isfinite(per_tensor[1])
    # Non-finite gradients are still accumulated; the caller decides what to do.
    got, want = accums[1][50000].double(), want_acc[1][50000]
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    keep = torch.ones(65537, dtype=torch.bool, device=DEVICE)
    keep[50000] = False
    assert_close_rel(accums[1][keep], want_acc[1][keep], RTOL[torch.float32])


def test_accumulate_large_fp16_gradients_are_finite():
    """Squares of fp16 values near 65504 overflow fp16 but not the fp32 sums."""
    accums, grads = random_pairs([1023, 4097], torch.float16, torch.float32)
    for g in grads:
        g.fill_(60000.0)
    _, per_tensor, _, nonfinite = tri.accumulate_triton(accums, grads, 1e-4, False)
    assert not nonfinite.item()
    want = torch.tensor([1023.0, 4097.0], dtype=torch.float64) * 60000.0**2
    assert_close_rel(per_tensor, want, SUMSQ_RTOL)


def test_accumulate_through_public_wrapper():
    """fastaccum.accumulate_(backend="triton") routes here."""
    accums, grads = random_pairs([3, 1023], torch.bfloat16, torch.float32, seed=4)
    want_acc, want_sumsq = expected_accumulate(accums, grads, 2.0)
    res = fastaccum.accumulate_(accums, grads, 2.0, zero_grads=True, backend="triton")
    assert isinstance(res, fastaccum.AccumulateResult)
    assert_close_rel(res.grad_sumsq_per_tensor, want_sumsq, SUMSQ_RTOL)
    for a, w in zip(accums, want_acc, strict=True):
        assert_close_rel(a, w, RTOL[torch.float32])


def test_accumulate_sums_are_deterministic():
    accums, grads = random_pairs(SIZES, torch.bfloat16, torch.float32, seed=2)
    runs = []
    for pointer_tables in (True, True, False):
        a, g = clones(accums), clones(grads)
        out = tri.launch_accumulate(a, g, 0.75, False, pointer_tables=pointer_tables)
        runs.append((*out, *a))
    # Two runs alike, and the per-tensor launches (the torch.compile path) bit for bit too.
    assert_results_equal(runs[0], runs[1])
    assert_results_equal(runs[0], runs[2])


# --------------------------------------------------------------------------- finalize


def expected_finalize(accums, factor, factor_tensor):
    ft = 1.0 if factor_tensor is None else factor_tensor.double().item()
    return [a.double() * factor * ft for a in accums]


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("factor_tensor_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero_accums", [True, False])
def test_finalize_matches_float64(out_dtype, factor_tensor_dtype, zero_accums):
    # Both accumulator dtypes in one call: two groups, one launch each.
    accums = random_pairs(SIZES, torch.float32, torch.float32)[0]
    accums += random_pairs(SIZES[:3], torch.bfloat16, torch.bfloat16, seed=3)[0]
    outs = [] if out_dtype is None else [torch.empty_like(a, dtype=out_dtype) for a in accums]
    factor = 1.0 / 3.0
    factor_tensor = None
    if factor_tensor_dtype is not None:  # a shape [1] tensor, as a clip coefficient may be
        factor_tensor = torch.tensor([0.8125], dtype=factor_tensor_dtype, device=DEVICE)
    want = expected_finalize(accums, factor, factor_tensor)
    ref_accums, ref_outs = clones(accums), clones(outs)
    finalize_ref(ref_accums, ref_outs, factor, factor_tensor, zero_accums)

    tri.finalize_triton(accums, outs, factor, factor_tensor, zero_accums)

    for a, w in zip(accums, want, strict=True):
        if zero_accums:
            assert torch.count_nonzero(a).item() == 0
        else:
            assert_close_rel(a, w, RTOL[a.dtype])
    for o, w in zip(outs, want, strict=False):  # outs may be empty
        assert_close_rel(o, w, RTOL[o.dtype])
    # Same fp32 products in the same order as the reference: equal bit for bit, except the
    # interpreter's truncating fp32 -> bf16 cast.
    exact = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])
    for mine, ref in zip(accums + outs, ref_accums + ref_outs, strict=True):
        if mine.dtype in exact:
            assert torch.equal(mine, ref)


def test_finalize_empty_list():
    assert tri.finalize_triton([], [], 1.0, None, True) is None


def test_finalize_per_tensor_launches_match_tables():
    accums = random_pairs([1, 1023, 65537], torch.float32, torch.float32, offset=1)[0]
    factor_tensor = torch.tensor(0.3, device=DEVICE)
    runs = []
    for pointer_tables in (True, False):
        a = clones(accums)
        outs = [torch.empty_like(x, dtype=torch.bfloat16) for x in a]
        tri.launch_finalize(a, outs, 0.5, factor_tensor, False, pointer_tables=pointer_tables)
        runs.append(a + outs)
    assert_results_equal(runs[0], runs[1])


def test_finalize_through_public_wrapper():
    accums = random_pairs([5, 2000], torch.float32, torch.float32, seed=5)[0]
    want = expected_finalize(accums, 0.25, None)
    outs = [torch.empty_like(a) for a in accums]
    fastaccum.finalize_(accums, outs, 0.25, backend="triton")
    for a, o, w in zip(accums, outs, want, strict=True):
        assert torch.count_nonzero(a).item() == 0
        assert_close_rel(o, w, RTOL[torch.float32])


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_rejected_before_any_write():
    accums, grads = random_pairs([6, 6], torch.float32, torch.float32)
    before = clones(accums)
    with pytest.raises(ValueError, match="not contiguous"):
        tri.accumulate_triton([accums[0], accums[1][::2]], [grads[0], grads[1][::2]], 1.0, False)
    with pytest.raises(ValueError, match="same length"):
        tri.accumulate_triton(accums, grads[:1], 1.0, False)
    with pytest.raises(ValueError, match="shape"):
        tri.finalize_triton(accums, [grads[0], grads[1][:3]], 1.0, None, True)
    assert_results_equal(accums, before)


def test_device_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_backend, "triton_can_run", lambda device: False)
    accums, grads = random_pairs([4], torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="cannot run on"):
        tri.accumulate_triton(accums, grads, 1.0, False)


def test_meta_tensors_get_shapes_only():
    accums = [torch.empty(10, device="meta"), torch.empty(3, device="meta")]
    grads = [torch.empty(10, device="meta", dtype=torch.bfloat16), torch.empty(3, device="meta")]
    out = tri.accumulate_triton(accums, grads, 1.0, False)
    assert [tuple(t.shape) for t in out] == [(), (2,), (), ()]
    assert all(t.is_meta for t in out)


# --------------------------------------------------------------------------- torch.library


def test_ops_share_the_namespace_with_the_extension():
    """Python FRAGMENT registrations beside the C++ TORCH_LIBRARY(fastaccum) (when built)."""
    assert hasattr(torch.ops.fastaccum, "accumulate_triton_")
    assert hasattr(torch.ops.fastaccum, "finalize_triton_")
    if _backend.has_extension():
        assert hasattr(torch.ops.fastaccum, "accumulate_")


# The interpreter runs no traced tensors (wrap_triton hands it the raw kernel), so the
# aot_dispatch checks need a GPU; the subprocess test below traces without running.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")
if not INTERPRETED:
    OPCHECK_UTILS += ("test_aot_dispatch_dynamic",)


def test_opcheck_accumulate():
    accums, grads = random_pairs([3, 1023], torch.bfloat16, torch.float32)
    torch.library.opcheck(
        torch.ops.fastaccum.accumulate_triton_.default,
        (accums, grads, 0.5, True),
        test_utils=OPCHECK_UTILS,
    )


@pytest.mark.parametrize("with_outs", [False, True])
def test_opcheck_finalize(with_outs):
    accums = random_pairs([3, 1023], torch.float32, torch.float32)[0]
    outs = [torch.empty_like(a, dtype=torch.bfloat16) for a in accums] if with_outs else []
    factor_tensor = torch.tensor(2.0, device=DEVICE)
    torch.library.opcheck(
        torch.ops.fastaccum.finalize_triton_.default,
        (accums, outs, 0.5, factor_tensor, False),
        test_utils=OPCHECK_UTILS,
    )


def accumulate_then_finalize(accums, grads, outs, factor_tensor):
    """A micro-step and the window's end, as an optimizer wrapper would compile them."""
    grad_sumsq, _, _, nonfinite = tri.accumulate_triton(accums, grads, 0.5, True)
    tri.finalize_triton(accums, outs, 0.25, factor_tensor, True)
    return grad_sumsq.sqrt(), nonfinite


def test_compile_fullgraph():
    """One graph, no breaks. Without a GPU, backend='eager' (dynamo capture, the op as one
    node, checked with its fake kernel); lowering needs real Triton, see the next test."""
    accums, grads = random_pairs([3, 1023, 20000], torch.bfloat16, torch.float32)
    outs = [torch.empty_like(a, dtype=torch.bfloat16) for a in accums]
    factor_tensor = torch.tensor(0.5, device=DEVICE)
    args = clones(accums), clones(grads), clones(outs), factor_tensor
    want = accumulate_then_finalize(*args)

    torch._dynamo.reset()
    backend = "eager" if INTERPRETED else "inductor"
    compiled = torch.compile(accumulate_then_finalize, backend=backend, fullgraph=True)
    got = compiled(accums, grads, outs, factor_tensor)

    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    assert got[1].item() == want[1].item()
    assert_results_equal(accums + grads + outs, args[0] + args[1] + args[2])
    if INTERPRETED:
        torch._dynamo.reset()
        lowered = torch.compile(accumulate_then_finalize, backend="aot_eager", fullgraph=True)
        with pytest.raises(Exception, match="TRITON_INTERPRET=1"):
            lowered(accums, grads, outs, factor_tensor)
    torch._dynamo.reset()


def test_compile_traces_into_the_kernels():
    """AOTAutograd decomposes the ops into their Triton kernels (the per-tensor launches),
    and hands the mutated inputs back. Traced only: the backend stops before running."""
    out = run_without_interpreter(
        """
        import json
        import torch
        from torch._dynamo.backends.common import aot_autograd
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
        from tests.triton.test_accumulate import accumulate_then_finalize

        graphs = []

        class Traced(Exception):
            pass

        def stop(gm, example_inputs):
            graphs.append(gm)
            raise Traced

        accums = [torch.randn(5), torch.randn(40000)]
        grads = [torch.randn(5, dtype=torch.bfloat16), torch.randn(40000, dtype=torch.bfloat16)]
        outs = [torch.empty(5, dtype=torch.bfloat16), torch.empty(40000)]
        fn = torch.compile(accumulate_then_finalize, backend=aot_autograd(fw_compiler=stop),
                           fullgraph=True)
        try:
            fn(accums, grads, outs, torch.tensor(2.0))
        except Exception as e:
            assert "Traced" in str(e), e
        nodes = [n for n in graphs[0].graph.nodes if "triton_kernel_wrapper" in str(n.target)]
        kernels = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
                   for n in nodes]
        outputs = len(next(iter(graphs[0].graph.find_nodes(op="output"))).args[0])
        print(json.dumps({"kernels": kernels, "outputs": outputs}))
        """
    )
    traced = json.loads(out)
    assert traced["kernels"] == [
        "_accumulate_direct_kernel",
        "_accumulate_direct_kernel",
        "_reduce_partials_kernel",
        "_finalize_direct_kernel",
        "_finalize_direct_kernel",
    ]
    # The updated accums, grads and outs (2 each) are graph outputs, copied back into the
    # inputs; then the two results. Without a GPU driver torch cannot analyse the kernels
    # and also counts factor_tensor as written (one more).
    assert traced["outputs"] in (8, 9)


def test_kernels_compile_for_gpus():
    """The table kernels compile for sm_80 and sm_90 (no GPU needed) and, when the group is
    16-byte aligned, load and store through 16-byte vectors."""
    out = compile_for_gpus(
        """
        import json, re
        import triton.language as tl
        from fastaccum.triton import accumulate as tri

        sizes = {"BLOCK": tri.BLOCK, "ITERS": tri.ITERS}
        found = {}
        for arch in (80, 90):
            for aligned in (True, False):
                acc = ptx(tri._accumulate_table_kernel, {
                    "tensor_table": "*i64", "item_table": "*i32", "grad_partials": "*fp32",
                    "accum_partials": "*fp32", "nonfinite_partials": "*i32", "scale": "fp32",
                    "ACCUM_DTYPE": tl.float32, "GRAD_DTYPE": tl.bfloat16, "ALIGNED": aligned,
                    "ZERO_GRADS": True, **sizes}, arch)
                fin = ptx(tri._finalize_table_kernel, {
                    "tensor_table": "*i64", "item_table": "*i32", "factor_ptr": "*fp32",
                    "factor": "fp32", "ACCUM_DTYPE": tl.float32, "OUT_DTYPE": tl.bfloat16,
                    "ALIGNED": aligned, "ZERO_ACCUMS": False, **sizes}, arch)
                found[f"{arch}-{aligned}"] = [
                    "ld.global.v4.b32" in acc, "st.global.v4.b32" in acc,
                    "ld.global.v4.b32" in fin, "st.global.v4.b32" in fin]
        print(json.dumps(found))
        """
    )
    found = json.loads(out)
    for arch in (80, 90):
        assert found[f"{arch}-True"] == [True] * 4
        assert found[f"{arch}-False"] == [False] * 4
