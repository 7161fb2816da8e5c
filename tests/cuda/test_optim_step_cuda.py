"""The CUDA kernels of ``sgd_window_step_`` / ``adam_window_step_`` against the float64
references, ``torch.optim`` on the same GPU, and the fused optimizer classes in training.

Needs a CUDA GPU and ``fastaccum._C`` built with these ops' CUDA kernels; skips otherwise.
Cases run both through the public wrappers (``backend="native"``) and straight through
``torch.ops.fastaccum``, whose checks live in csrc/cuda/optim_step_binding.cpp.

Error bounds, as in tests/ops/test_optim_step.py: state within 1e-6 of float64
(‖out − ref‖ / ‖ref‖); the parameter within 1e-5 of its float64 change plus the rounding of
the stored fp32 value.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

import fastaccum.optim as fo
from fastaccum import _backend
from fastaccum.ops import accumulate_, adam_window_step_, sgd_window_step_
from fastaccum.ops.optim_step import (
    ADAM_OPTIONS,
    SGD_OPTIONS,
    adam_window_step_ref,
    sgd_window_step_ref,
)
from tests.helpers import assert_close_rel, make_model, mean_loss, split_windows, token_batches
from tests.ops.test_optim_step import ADAM_CASES as ADAM_OPTIM_CASES
from tests.ops.test_optim_step import SGD_CASES as SGD_BASE_CASES
from tests.ops.test_optim_step import STATE_RTOL, assert_update_close

OPS = ("sgd_window_step_", "adam_window_step_")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available()
        or not all(_backend.native_can_run(torch.device("cuda"), op) for op in OPS),
        reason="needs a CUDA GPU and fastaccum._C built with the optimizer steps' CUDA kernels",
    ),
]

DEVICE = "cuda"
SIZES = [1, 3, 1023, 65537, 3_000_017, 0]
SGD_DEFAULTS = {
    "momentum": 0.0,
    "dampening": 0.0,
    "weight_decay": 0.0,
    "nesterov": False,
    "maximize": False,
    "first_step": False,
}
ADAM_DEFAULTS = {
    "beta1": 0.9,
    "beta2": 0.999,
    "eps": 1e-8,
    "weight_decay": 0.0,
    "decoupled_weight_decay": False,
    "maximize": False,
}
# op -> (wrapper, float64 reference, scalar names in schema order, their defaults)
STEPS: dict[str, tuple[Callable[..., None], Callable[..., None], tuple[str, ...], dict]] = {
    "sgd": (sgd_window_step_, sgd_window_step_ref, SGD_OPTIONS, SGD_DEFAULTS),
    "adam": (adam_window_step_, adam_window_step_ref, ADAM_OPTIONS, ADAM_DEFAULTS),
}
Tensors = list[torch.Tensor]
# params, accums, then the state lists: SGD's momentum buffers (None without momentum), or
# Adam's exp_avgs and exp_avg_sqs, then with amsgrad its max_exp_avg_sqs.
Lists = Sequence[Tensors | None]


def _randn(sizes: list[int], seed: int, positive: bool = False) -> Tensors:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    out = [torch.randn(n, generator=gen, device=DEVICE) for n in sizes]
    return [t.abs() * 0.1 for t in out] if positive else out


def _factor_tensor(dtype: torch.dtype | None, value: float = 0.75) -> torch.Tensor | None:
    return None if dtype is None else torch.tensor(value, dtype=dtype, device=DEVICE)


def run_step(
    op: str,
    via: str,
    lists: Lists,
    factor: float,
    factor_tensor: torch.Tensor | None,
    options: dict[str, Any],
) -> None:
    """``<op>_window_step_`` on the native backend, through the wrapper or torch.ops."""
    wrapper, _, names, defaults = STEPS[op]
    if via == "wrapper":
        extra = {"max_exp_avg_sqs": lists[4]} if len(lists) > 4 else {}
        wrapper(
            *lists[:4], factor, factor_tensor=factor_tensor, backend="native", **extra, **options
        )
    else:
        scalars = [{**defaults, **options}[name] for name in names]
        tensors = [[] if t is None else t for t in lists]
        if op == "adam" and len(tensors) == 4:
            tensors.append([])  # no amsgrad
        getattr(torch.ops.fastaccum, f"{op}_window_step_")(
            *tensors, factor, factor_tensor, *scalars
        )


def expected(
    op: str,
    lists: Lists,
    factor: float,
    factor_tensor: torch.Tensor | None,
    options: dict[str, Any],
) -> list[Tensors | None]:
    """``lists`` after the float64 reference step, on float64 copies."""
    _, reference, _, defaults = STEPS[op]
    copies = [None if t is None else [x.double() for x in t] for t in lists]
    no_maxima = [None] if op == "adam" and len(copies) == 4 else []  # no amsgrad
    reference(*copies, *no_maxima, factor, factor_tensor, **{**defaults, **options})
    return copies


def check_step(lists: Lists, old: Tensors, want: list[Tensors | None]) -> None:
    """Parameters and states agree with :func:`expected`'s; accumulators are zero."""
    params, accums, *states = lists
    for i, p in enumerate(params):
        assert p.dtype == torch.float32 and p.is_cuda
        assert_update_close(p, old[i], want[0][i])
        assert torch.count_nonzero(accums[i]).item() == 0, f"accums[{i}] was not zeroed"
    for got, ref in zip(states, want[2:], strict=True):
        for g, r in zip(got or [], ref or [], strict=True):
            assert_close_rel(g, r, STATE_RTOL)


def step_and_check(op: str, via: str, lists: Lists, *args: Any) -> None:
    """:func:`run_step` on ``lists`` (``args``: factor, factor_tensor, options), checked
    against the float64 reference."""
    want = expected(op, lists, *args)
    old = [p.clone() for p in lists[0]]
    run_step(op, via, lists, *args)
    check_step(lists, old, want)


# --------------------------------------------------------------------------- SGD

SGD_CASES = {
    **SGD_BASE_CASES,
    "decay": {"weight_decay": 0.05},
    "nesterov first step decay": {
        "momentum": 0.8,
        "nesterov": True,
        "first_step": True,
        "weight_decay": 0.02,
    },
}


@pytest.mark.parametrize("ft_dtype", [None, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("via", ["wrapper", "ops"])
@pytest.mark.parametrize("case", SGD_CASES)
def test_sgd_matches_float64_reference(case: str, via: str, ft_dtype: torch.dtype | None) -> None:
    options = {"lr": 0.1, **SGD_CASES[case]}
    buffers = _randn(SIZES, 2) if options.get("momentum") else None
    if options.get("first_step") and buffers:  # never read on the first step: no NaN leaks
        buffers = [torch.full_like(b, math.nan) for b in buffers]
    lists = (_randn(SIZES, 0), _randn(SIZES, 1), buffers)
    step_and_check("sgd", via, lists, 0.3, _factor_tensor(ft_dtype), options)


# --------------------------------------------------------------------------- Adam


def _adam_options(extra: dict[str, Any]) -> dict[str, Any]:
    """A tests/ops case (torch.optim's ``betas``) as adam_window_step_ arguments."""
    options = dict(extra)
    if "betas" in options:
        options["beta1"], options["beta2"] = options.pop("betas")
    return options


ADAM_CASES = {
    **{name: (_adam_options(extra), step) for name, (extra, step) in ADAM_OPTIM_CASES.items()},
    "late step beta1 0": ({"beta1": 0.0}, 1000),
}


def _adam_tensors(
    sizes: list[int], seed: int, step: int, amsgrad: bool = False
) -> tuple[Tensors, ...]:
    """params, accums, exp_avgs, exp_avg_sqs, and with amsgrad max_exp_avg_sqs (of the
    second moments' size, so that the maximum keeps about half of them)."""
    params, accums, m = (_randn(sizes, seed + k) for k in range(3))
    v = _randn(sizes, seed + 3, positive=True)
    vmax = _randn(sizes, seed + 4, positive=True)
    if step == 1:  # torch's first step starts from zeroed moments
        m, v, vmax = ([torch.zeros_like(t) for t in x] for x in (m, v, vmax))
    return (params, accums, m, v, vmax) if amsgrad else (params, accums, m, v)


@pytest.mark.parametrize("ft_dtype", [None, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("via", ["wrapper", "ops"])
@pytest.mark.parametrize("case", ADAM_CASES)
def test_adam_matches_float64_reference(case: str, via: str, ft_dtype: torch.dtype | None) -> None:
    extra, step = ADAM_CASES[case]
    options = {"lr": 0.01, "eps": 1e-6, **extra, "step": step}
    lists = _adam_tensors(SIZES, 10, step, options.pop("amsgrad", False))
    step_and_check("adam", via, lists, 0.2, _factor_tensor(ft_dtype, 1.5), options)


# ---------------------------------------------------------------- against torch.optim


def _torch_step(
    cls: type[torch.optim.Optimizer],
    params: Tensors,
    grads: Tensors,
    states: list[dict[str, torch.Tensor]],
    **options: Any,
) -> tuple[Tensors, list[dict[str, torch.Tensor]]]:
    """One step of torch.optim's ``cls`` on fp32 CUDA copies; returns (params, states)."""
    copies = [p.clone().requires_grad_() for p in params]
    opt = cls(copies, **options)
    for p, g, state in zip(copies, grads, states, strict=True):
        p.grad = g.clone()
        if state:
            opt.state[p] = {k: v.clone() for k, v in state.items()}
    opt.step()
    return [p.detach() for p in copies], [opt.state[p] for p in copies]


@pytest.mark.parametrize("foreach", [False, True], ids=["single-tensor", "foreach"])
@pytest.mark.parametrize("first_step", [False, True], ids=["with-buffer", "first-step"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_optim_on_cuda(nesterov: bool, first_step: bool, foreach: bool) -> None:
    options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": nesterov}
    if not nesterov:
        options["dampening"] = 0.2
    params, accums, buffers = _randn(SIZES, 20), _randn(SIZES, 21), _randn(SIZES, 22)
    grads = [a * 0.3 for a in accums]  # the fp32 window gradient the kernel forms
    states = [{} if first_step else {"momentum_buffer": b} for b in buffers]
    want, want_states = _torch_step(
        torch.optim.SGD, params, grads, states, foreach=foreach, **options
    )
    old = [p.clone() for p in params]

    run_step(
        "sgd", "ops", (params, accums, buffers), 0.3, None, options | {"first_step": first_step}
    )

    buffers_want = [state["momentum_buffer"] for state in want_states]
    check_step((params, accums, buffers), old, [want, None, buffers_want])


@pytest.mark.parametrize("foreach", [False, True], ids=["single-tensor", "foreach"])
@pytest.mark.parametrize("kind", ["Adam", "Adam-l2", "AdamW", "AdamW-amsgrad"])
def test_adam_matches_torch_optim_on_cuda(kind: str, foreach: bool) -> None:
    step, wd = 5, 0.0 if kind == "Adam" else 0.1
    decoupled, amsgrad = kind.startswith("AdamW"), kind.endswith("amsgrad")
    lists = _adam_tensors(SIZES, 30, step, amsgrad)
    grads = [a * 0.2 for a in lists[1]]
    states = [
        {"step": torch.tensor(float(step - 1)), "exp_avg": mi, "exp_avg_sq": vi}
        for mi, vi in zip(lists[2], lists[3], strict=True)
    ]
    if amsgrad:
        for state, vmax in zip(states, lists[4], strict=True):
            state["max_exp_avg_sq"] = vmax
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    options = {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": wd}
    want, want_states = _torch_step(
        cls, lists[0], grads, states, foreach=foreach, amsgrad=amsgrad, **options
    )
    old = [p.clone() for p in lists[0]]

    ours = _adam_options(options) | {"decoupled_weight_decay": decoupled, "step": step}
    run_step("adam", "ops", lists, 0.2, None, ours)

    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")[: len(lists) - 2]
    moments = [[state[key] for state in want_states] for key in keys]
    check_step(lists, old, [want, None, *moments])


# ----------------------------------------------------------------- layout and launches

# Element offsets of (param, accum, state1, state2, state3) into larger buffers: all
# alignable at the same element, only some of them, and never together (the scalar path).
# state3 is amsgrad's maximum; the last two cases misalign it alone.
OFFSETS = [
    (0, 0, 0, 0, 0),
    (1, 1, 1, 1, 1),
    (0, 1, 0, 0, 0),
    (2, 2, 2, 3, 2),
    (3, 1, 2, 0, 1),
    (0, 0, 3, 3, 3),
    (0, 0, 0, 0, 1),
    (2, 2, 2, 2, 3),
]


@pytest.mark.parametrize("offsets", OFFSETS, ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adam-amsgrad"])
def test_misaligned_views(optimizer: str, offsets: tuple[int, ...]) -> None:
    sizes = [65537, 3, 20000]
    # SGD: param, accum, momentum buffer; Adam: exp_avg, exp_avg_sq (and the maximum) too
    roles = {"sgd": 3, "adam": 4, "adam-amsgrad": 5}[optimizer]
    lists: list[Tensors] = [[] for _ in range(roles)]
    backing = []
    for n in sizes:
        for r in range(roles):
            buf = _randn([n + 16], 40 + 10 * r + n % 7)[0]
            if r >= 3:
                buf = buf.abs() * 0.1  # exp_avg_sq and its maximum >= 0
            backing.append((buf, buf.clone(), offsets[r], n))
            lists[r].append(buf[offsets[r] : offsets[r] + n])

    if optimizer.startswith("adam"):
        options = {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "step": 3}
    else:
        options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}
    step_and_check(optimizer.removesuffix("-amsgrad"), "ops", lists, 0.5, None, options)
    for buf, before, off, n in backing:  # nothing outside the views was touched
        assert torch.equal(buf[:off], before[:off])
        assert torch.equal(buf[off + n :], before[off + n :])


def test_more_tensors_than_one_launch() -> None:
    # A launch carries at most 512 tensors in its arguments; 1000 take two launches.
    sizes = torch.randint(0, 5001, (1000,), generator=torch.Generator().manual_seed(50)).tolist()
    adam = {"lr": 0.01, "weight_decay": 0.1, "step": 4}
    step_and_check("adam", "wrapper", _adam_tensors(sizes, 50, 4), 0.25, None, adam)
    step_and_check("adam", "wrapper", _adam_tensors(sizes, 55, 4, True), 0.25, None, adam)
    sgd = {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}
    lists = (_randn(sizes, 60), _randn(sizes, 61), _randn(sizes, 62))
    step_and_check("sgd", "wrapper", lists, 2.0, None, sgd)


def test_multidimensional_and_zero_size_shapes() -> None:
    shapes = [(768, 2304), (3, 5, 7), (7, 0), (1,), ()]
    gen = torch.Generator(device=DEVICE).manual_seed(70)
    params, accums, m, v = (
        [torch.randn(s, generator=gen, device=DEVICE) for s in shapes] for _ in range(4)
    )
    v = [t.abs() for t in v]
    step_and_check("adam", "ops", (params, accums, m, v), 1.0, None, {"lr": 0.01, "step": 2})
    assert [tuple(p.shape) for p in params] == shapes


def test_nonfinite_accumulator_stays_in_its_element() -> None:
    # The fused step has no non-finite check of its own (the wrapper skips such windows
    # before it runs); a NaN must still not spread beyond its element.
    params, accums, m, v = _adam_tensors([70001], 80, 2)
    accums[0][12345] = math.nan
    run_step("adam", "ops", (params, accums, m, v), 1.0, None, {"lr": 0.01, "step": 2})
    for t in (params[0], m[0], v[0]):
        assert math.isnan(t[12345].item())
        assert int(torch.isnan(t).sum()) == 1
    assert torch.count_nonzero(accums[0]).item() == 0


def test_amsgrad_maximum_propagates_nan() -> None:
    # torch.maximum keeps a NaN from either side; the kernel must not drop it (fmaxf would).
    params, accums, m, v, vmax = _adam_tensors([70001], 85, 2, amsgrad=True)
    accums[0][12345] = math.nan  # the new second moment of element 12345 is NaN
    vmax[0][777] = math.nan  # the stored maximum of element 777 is NaN
    lists = (params, accums, m, v, vmax)
    run_step("adam", "ops", lists, 1.0, None, {"lr": 0.01, "step": 2})
    for t in (params[0], vmax[0]):
        assert int(torch.isnan(t).sum()) == 2
        assert math.isnan(t[12345].item()) and math.isnan(t[777].item())


def test_device_factor_from_accumulate_needs_no_sync() -> None:
    # A clip coefficient computed on the device goes straight into the step.
    params, accums, m, v = _adam_tensors([65537, 1023], 90, 3)
    grads = _randn([65537, 1023], 95)
    result = accumulate_(accums, grads, 1.0, backend="native")
    coef = (1.0 / (result.accum_sumsq.sqrt() + 1e-6)).clamp(max=1.0)
    lists = (params, accums, m, v)
    want = expected("adam", lists, 0.5, coef, {"lr": 0.01, "step": 3})
    old = [p.clone() for p in params]
    adam_window_step_(*lists, 0.5, factor_tensor=coef, lr=0.01, step=3, backend="native")
    check_step(lists, old, want)


def test_runs_on_the_current_stream() -> None:
    # The accumulator is written on a side stream behind a long sleep; a kernel launched on
    # any other stream would read it before the write lands.
    params, accums, m, v = _adam_tensors([1 << 20], 100, 2)
    source = accums[0].clone()
    accums[0].zero_()
    options = {"lr": 0.01, "step": 2}
    want = expected("adam", (params, [source], m, v), 1.0, None, options)
    old = [p.clone() for p in params]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        accums[0].copy_(source)
        run_step("adam", "ops", (params, accums, m, v), 1.0, None, options)
    side.synchronize()
    check_step((params, accums, m, v), old, want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_device_that_is_not_current() -> None:
    gen = torch.Generator(device="cuda:1").manual_seed(110)
    params, accums, buffers = (
        [torch.randn(5000, generator=gen, device="cuda:1")] for _ in range(3)
    )
    lists = (params, accums, buffers)
    options = {"lr": 0.1, "momentum": 0.9}
    want = expected("sgd", lists, 1.0, None, options)
    old = [p.clone() for p in params]
    with torch.cuda.device(0):
        run_step("sgd", "ops", lists, 1.0, None, options)
    torch.cuda.synchronize("cuda:1")
    check_step(lists, old, want)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_native_and_triton_agree(amsgrad: bool) -> None:
    pytest.importorskip("triton")
    runs = []
    for backend in ("native", "triton"):
        params, accums, m, v, *vmax = _adam_tensors([65537, 1023, 3], 120, 4, amsgrad)
        adam_window_step_(
            params, accums, m, v, 0.5, max_exp_avg_sqs=vmax[0] if vmax else None, lr=0.01,
            weight_decay=0.1, step=4, backend=backend,
        )  # fmt: skip
        runs.append([*params, *m, *v, *(vmax[0] if vmax else [])])
    for native, triton in zip(*runs, strict=True):
        assert_close_rel(native, triton, STATE_RTOL)


def test_cuda_tensors_route_to_the_native_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FASTACCUM_BACKEND", raising=False)
    for op in OPS:
        assert _backend.select(torch.device(DEVICE), None, op=op) == _backend.NATIVE


# ----------------------------------------------------------------------------- bad input


def _f32(n: int = 6) -> torch.Tensor:
    return torch.randn(n, device=DEVICE)


# name -> (build (params, accums, buffers), options (factor_tensor: a function making it),
# the wrapper's exception, message). Tensors are made in the test, where a GPU is known.
SgdCase = tuple[Callable[[], tuple], dict[str, Any], type[Exception], str]
SGD_INVALID: dict[str, SgdCase] = {
    "length": (lambda: ([_f32(), _f32()], [_f32()], None), {}, ValueError, "as long as params"),
    "shape": (lambda: ([_f32(6)], [_f32(7)], None), {}, ValueError, "shape"),
    "bf16 param": (lambda: ([_f32().bfloat16()], [_f32()], None), {}, TypeError, "float32"),
    "fp64 buffer": (
        lambda: ([_f32()], [_f32()], [_f32().double()]),
        {"momentum": 0.9},
        TypeError,
        "float32",
    ),
    "non-contiguous": (
        lambda: ([torch.randn(3, 4, device=DEVICE).t()], [torch.randn(4, 3, device=DEVICE)], None),
        {},
        ValueError,
        "contiguous",
    ),
    "cpu accum": (lambda: ([_f32()], [torch.randn(6)], None), {}, ValueError, "one device"),
    "cpu factor tensor": (
        lambda: ([_f32()], [_f32()], None),
        {"factor_tensor": lambda: torch.tensor(0.5)},
        ValueError,
        "one device",
    ),
    "two-element factor tensor": (
        lambda: ([_f32()], [_f32()], None),
        {"factor_tensor": lambda: torch.ones(2, device=DEVICE)},
        ValueError,
        "one element",
    ),
    "int factor tensor": (
        lambda: ([_f32()], [_f32()], None),
        {"factor_tensor": lambda: torch.ones((), dtype=torch.int32, device=DEVICE)},
        ValueError,
        "floating-point",
    ),
    "nan lr": (lambda: ([_f32()], [_f32()], None), {"lr": math.nan}, ValueError, "lr must be"),
    "buffers without momentum": (
        lambda: ([_f32()], [_f32()], [_f32()]),
        {},
        ValueError,
        "must be empty",
    ),
    "momentum without buffers": (
        lambda: ([_f32()], [_f32()], None),
        {"momentum": 0.9},
        ValueError,
        "as long as",
    ),
    "nesterov with dampening": (
        lambda: ([_f32()], [_f32()], [_f32()]),
        {"momentum": 0.9, "dampening": 0.1, "nesterov": True},
        ValueError,
        "nesterov",
    ),
}


@pytest.mark.parametrize("via", ["wrapper", "ops"])
@pytest.mark.parametrize("case", SGD_INVALID)
def test_sgd_bad_input_changes_nothing(case: str, via: str) -> None:
    build, options, error, match = SGD_INVALID[case]
    params, accums, buffers = build()
    touched = [*params, *accums, *(buffers or [])]
    before = [t.clone() for t in touched]
    options = {"lr": 0.1, **options}
    factor_tensor = options.pop("factor_tensor", lambda: None)()
    with pytest.raises(error if via == "wrapper" else RuntimeError, match=match):
        run_step("sgd", via, (params, accums, buffers), 1.0, factor_tensor, options)
    for t, b in zip(touched, before, strict=True):
        assert torch.equal(t, b), "an invalid call modified its inputs"


def test_sgd_same_tensor_rejected() -> None:
    p = _f32()
    with pytest.raises(RuntimeError, match="same tensor"):
        run_step("sgd", "ops", ([p], [p], None), 1.0, None, {"lr": 0.1})


@pytest.mark.parametrize("via", ["wrapper", "ops"])
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"step": 0}, "step must be >= 1"),
        ({"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
        ({"beta2": -0.1}, r"beta2 must be in \[0, 1\)"),
        ({"eps": math.inf}, "eps must be finite"),
        ({"state_shape": 5}, r"exp_avg_sqs\[0\] has shape"),
        ({"state_dtype": torch.bfloat16}, "float32"),
    ],
    ids=["step", "beta1", "beta2", "eps", "shape", "dtype"],
)
def test_adam_bad_input_changes_nothing(via: str, options: dict[str, Any], match: str) -> None:
    options = {"lr": 0.1, "step": 1, **options}
    p, a, m = _randn([6, 6, 6], 130)
    v = torch.rand(options.pop("state_shape", 6), device=DEVICE)
    v = v.to(options.pop("state_dtype", torch.float32))
    before = [t.clone() for t in (p, a, m, v)]
    with pytest.raises((TypeError, ValueError) if via == "wrapper" else RuntimeError, match=match):
        run_step("adam", via, ([p], [a], [m], [v]), 1.0, None, options)
    for t, b in zip((p, a, m, v), before, strict=True):
        assert torch.equal(t, b), "an invalid call modified its inputs"


@pytest.mark.parametrize("via", ["wrapper", "ops"])
@pytest.mark.parametrize(
    ("maxima", "match"),
    [
        (lambda p: [p.clone(), p.clone()], "max_exp_avg_sqs must be as long as params"),
        (lambda p: [p[:5].clone()], r"max_exp_avg_sqs\[0\] has shape"),
        (lambda p: [p.clone().double()], "float32"),
        (lambda p: [p], "same tensor"),
    ],
    ids=["length", "shape", "dtype", "same"],
)
def test_amsgrad_bad_maxima_change_nothing(via: str, maxima: Callable, match: str) -> None:
    p, a, m = _randn([6, 6, 6], 135)
    v = torch.rand(6, device=DEVICE)
    vmax = maxima(p)
    touched = [p, a, m, v, *vmax]
    before = [t.clone() for t in touched]
    with pytest.raises((TypeError, ValueError) if via == "wrapper" else RuntimeError, match=match):
        run_step("adam", via, ([p], [a], [m], [v], vmax), 1.0, None, {"lr": 0.1, "step": 2})
    for t, b in zip(touched, before, strict=True):
        assert torch.equal(t, b), "an invalid call modified its inputs"


# ------------------------------------------------------------------------------- opcheck


# name -> (op, number of tensor lists, scalars after the lists; FT stands for a factor_tensor)
FT = "factor_tensor"
OPCHECK_CASES = {
    "sgd nesterov": ("sgd", 3, (2.0, FT, 0.1, 0.9, 0.0, 0.01, True, False, False)),
    "sgd first step": ("sgd", 3, (2.0, None, 0.1, 0.9, 0.1, 0.0, False, False, True)),
    "sgd plain maximize": ("sgd", 2, (2.0, FT, 0.1, 0.0, 0.0, 0.0, False, True, False)),
    "adamw": ("adam", 4, (2.0, FT, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, False, 3)),
    "adam l2 maximize": ("adam", 4, (0.5, None, 1e-3, 0.3, 0.99, 1e-6, 0.1, False, True, 1)),
    "adamw amsgrad": ("adam", 5, (2.0, FT, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, False, 3)),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case: str) -> None:
    op, n_lists, scalars = OPCHECK_CASES[case]
    sizes = [3, 1023, 65537]
    lists = [_randn(sizes, 140 + k, positive=True) for k in range(n_lists)]
    if (op, n_lists) in (("sgd", 2), ("adam", 4)):
        lists.append([])  # no momentum buffers; no amsgrad maxima
    factor_tensor = torch.tensor(0.5, device=DEVICE)
    args = (*lists, *(factor_tensor if x == FT else x for x in scalars))
    torch.library.opcheck(getattr(torch.ops.fastaccum, f"{op}_window_step_").default, args)


# ------------------------------------------------------------------- fused optimizers

FUSED_KINDS = {
    "SGD": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True},
    "Adam": {"lr": 1e-2, "weight_decay": 0.1},
    "AdamW": {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99)},
    "AdamW-amsgrad": {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.5), "amsgrad": True},
}


@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_fused_optimizers_train_like_torch_on_the_big_batch(
    kind: str, max_grad_norm: float | None
) -> None:
    """fastaccum.optim.<kind> over K micro-batches on CUDA (fused step on the native kernel)
    equals torch.optim.<kind> stepping once per window on the concatenated batch."""
    k = 4
    batches = [(x.to(DEVICE), y.to(DEVICE)) for x, y in token_batches(4 * k - 2, seed=2)]
    want = make_model().to(DEVICE)
    model = copy.deepcopy(want)
    cls = kind.removesuffix("-amsgrad")
    torch_opt = getattr(torch.optim, cls)(want.parameters(), **FUSED_KINDS[kind])
    opt = getattr(fo, cls)(
        model.parameters(),
        accum_steps=k,
        max_grad_norm=max_grad_norm,
        model=model,
        **FUSED_KINDS[kind],
    )
    for window in split_windows(batches, k):  # 3 full windows, then a partial one
        x, y = torch.cat([b[0] for b in window]), torch.cat([b[1] for b in window])
        mean_loss(want, x, y).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(want.parameters(), max_grad_norm)
        torch_opt.step()
        torch_opt.zero_grad()
        for x, y in window:
            mean_loss(model, x, y).backward()
            opt.step(num_items=len(y))
            opt.zero_grad()
    assert opt.flush() is True

    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert p.is_cuda
        assert_close_rel(p, q, 1e-5)
        for key, value in torch_opt.state[q].items():
            if key != "step":
                assert_close_rel(opt.state[p][key], value, 1e-5)


@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_wrap_fused_update_on_cuda_is_opt_in_and_equals_torchs_step(kind: str) -> None:
    """``fastaccum.wrap(torch.optim.<kind>)`` on CUDA parameters: the default leaves the
    update to torch's step (GPU kernels not yet run on a GPU when this was written);
    ``fused_update=True`` runs the fused kernel and equals torch's step on the same window
    (rel 1e-6) and torch on the large batch (rel 1e-5)."""
    k = 4
    batches = [(x.to(DEVICE), y.to(DEVICE)) for x, y in token_batches(3 * k, seed=2)]
    cls = getattr(torch.optim, kind.removesuffix("-amsgrad"))
    runs, taken = {}, {}
    for setting in (None, True, False):
        model = make_model().to(DEVICE)
        opt = fo.wrap(
            cls(model.parameters(), **FUSED_KINDS[kind]),
            k,
            model=model,
            max_grad_norm=0.5,
            fused_update=setting,
        )
        taken[setting] = []
        for x, y in batches:
            mean_loss(model, x, y).backward()
            if opt.step(num_items=len(y)):
                taken[setting].append(opt.stats()["fused_update"])
            opt.zero_grad()
        runs[setting] = model
    assert taken == {None: [False] * 3, True: [True] * 3, False: [False] * 3}
    want = make_model().to(DEVICE)
    torch_opt = cls(want.parameters(), **FUSED_KINDS[kind])
    for window in split_windows(batches, k):
        x, y = torch.cat([b[0] for b in window]), torch.cat([b[1] for b in window])
        mean_loss(want, x, y).backward()
        torch.nn.utils.clip_grad_norm_(want.parameters(), 0.5)
        torch_opt.step()
        torch_opt.zero_grad()
    fused, stepped = runs[True].parameters(), runs[False].parameters()
    for p, q, r in zip(fused, stepped, want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-6)
        assert_close_rel(p, r, 1e-5)
