"""Shared test helpers: comparisons against float64 references, and a tiny token model
with variable-length micro-batches for the optimizer tests."""

import contextlib
import gc
import inspect
import io
from collections.abc import Iterator

import torch

import fastaccum


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Assert ‖actual − expected‖ / ‖expected‖ <= rtol, computed in float64 (NaN fails)."""
    a = actual.detach().double().cpu().flatten()
    e = expected.detach().double().cpu().flatten()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    err = torch.linalg.vector_norm(a - e).item()
    ref = torch.linalg.vector_norm(e).item()
    rel = err / ref if ref > 0 else err
    assert rel <= rtol, f"relative error {rel:.3e} > {rtol:.1e}"


VOCAB, DIM = 23, 16


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A small token model (embedding, MLP with LayerNorm, vocabulary head)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Embedding(VOCAB, DIM),
        torch.nn.Linear(DIM, 32),
        torch.nn.GELU(),
        torch.nn.LayerNorm(32),
        torch.nn.Linear(32, VOCAB),
    )
    return model.to(dtype)


def token_batches(n_micro: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches of 3 to 39 tokens each, as (tokens, targets); the loss of one is the
    mean over its own tokens, so micro-batches carry different numbers of items."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_micro):
        n = int(torch.randint(3, 40, (1,), generator=gen))
        x = torch.randint(0, VOCAB, (n,), generator=gen)
        batches.append((x, torch.randint(0, VOCAB, (n,), generator=gen)))
    return batches


def mean_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the micro-batch's tokens, computed in fp32 (in float64
    for a float64 model)."""
    logits = model(x)
    if logits.dtype != torch.float64:
        logits = logits.float()
    return torch.nn.functional.cross_entropy(logits, y)


def split_windows(batches: list, k: int) -> list[list]:
    """Consecutive windows of k micro-batches (the last may be shorter)."""
    return [batches[i : i + k] for i in range(0, len(batches), k)]


def make_opt(kind: str, params) -> torch.optim.Optimizer:
    """The optimizers the wrapper tests train with: ``"sgd"`` (momentum, weight decay) or
    ``"adamw"``."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


# torch.optim class name -> hyperparameters, shared by the fused-class tests: fastaccum's
# class of that name and torch's own are built from the same dict.
OPTIM_KINDS = {
    "SGD": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True},
    "Adam": {"lr": 1e-2, "weight_decay": 0.1},
    "AdamW": {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99)},
}


def large_batch_run(
    make_opt, windows: list[list], max_grad_norm=None, make_sched=None, dtype=torch.float32
):
    """The reference: plain torch, one backward per window on the mean loss over every
    token of the window, then clip (optional), step, and the scheduler (optional).

    ``make_opt(params)`` builds the torch optimizer, or a list of them (the native loop
    with several optimizers: each steps); ``make_sched(opt)`` gets what ``make_opt``
    returned and gives a scheduler or a list of them; ``dtype`` is the model's. Returns
    (model, optimizer).
    """
    model = make_model(dtype=dtype)
    opt = make_opt(model.parameters())
    sched = make_sched(opt) if make_sched else None
    large_batch_windows(model, opt, windows, max_grad_norm, sched)
    return model, opt


def large_batch_windows(model, opt, windows: list[list], max_grad_norm=None, sched=None) -> None:
    """:func:`large_batch_run`'s loop on a given model and optimizer (or list of them),
    with a scheduler (or list of them) stepped after every window."""
    opts = opt if isinstance(opt, list) else [opt]
    scheds = sched if isinstance(sched, list) else [] if sched is None else [sched]
    for window in windows:
        x = torch.cat([b[0] for b in window])
        y = torch.cat([b[1] for b in window])
        mean_loss(model, x, y).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        for o in opts:
            o.step()
            o.zero_grad()
        for s in scheds:
            s.step()


def by_shape(params) -> tuple[list, list]:
    """(2-D weights, the rest): how a model's parameters are split between
    ``torch.optim.Muon`` and an AdamW beside it."""
    params = list(params)
    return [p for p in params if p.ndim == 2], [p for p in params if p.ndim != 2]


def sgd_adamw(params) -> list[torch.optim.Optimizer]:
    """Two optimizers over one model, split :func:`by_shape`: SGD with momentum for the
    2-D weights, AdamW for LayerNorm and the biases."""
    matrices, rest = by_shape(params)
    return [
        torch.optim.SGD(matrices, lr=0.1, momentum=0.9),
        torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.1),
    ]


def fused_like(opt: torch.optim.Optimizer) -> fastaccum.AccumulatingOptimizer:
    """fastaccum's fused class for ``opt``'s type, over its one param group, with its
    settings."""
    cls = {torch.optim.SGD: fastaccum.optim.SGD, torch.optim.AdamW: fastaccum.optim.AdamW}
    fused = cls[type(opt)]
    accepted = inspect.signature(fused).parameters
    settings = {k: v for k, v in opt.defaults.items() if k in accepted}
    return fused(opt.param_groups[0]["params"], **settings)


def members_of(kind: str):
    """sgd_adamw's optimizers: torch's own, or with AdamW, or both, as fused classes."""
    fused = {"torch": (), "fused-adamw": (1,), "all-fused": (0, 1)}[kind]

    def make(params):
        members = sgd_adamw(params)
        return [fused_like(m) if i in fused else m for i, m in enumerate(members)]

    return make


def micro_step(model, opt, x, y, mode: str = "step") -> bool:
    """One micro-batch through a wrapper, with its item count: ``"step"`` is
    ``loss.backward(); opt.step(num_items=n)``, ``"backward"`` is
    ``opt.backward(loss, num_items=n); opt.step()``. Returns what ``step()`` returned."""
    loss = mean_loss(model, x, y)
    if mode == "backward":
        opt.backward(loss, num_items=len(y))
        stepped = opt.step()
    else:
        loss.backward()
        stepped = opt.step(num_items=len(y))
    opt.zero_grad()
    return stepped


def resume(model: torch.nn.Module, opt: torch.optim.Optimizer, build) -> tuple:
    """Checkpoint ``model`` and ``opt`` through ``torch.save`` / ``torch.load`` (bytes),
    then load both into a fresh ``(model, opt) = build()``, which is returned."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model, opt = build()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    return model, opt


def run_with_checkpoint(
    stop_at, batches: list, k: int = 4, dtype=torch.float32, build=None
) -> tuple:
    """Train the token model with ``wrap(AdamW, k, max_grad_norm=1)`` (or the ``(model,
    optimizer)`` that ``build(seed=...)`` makes) and ``opt.step``, resuming into a
    differently initialized model before micro-batch ``stop_at`` (None: no checkpoint).
    Returns (model, wrapper)."""

    def wrapped_adamw(seed=0):
        model = make_model(seed, dtype)
        opt = fastaccum.wrap(
            make_opt("adamw", model.parameters()), k, model=model, max_grad_norm=1.0
        )
        return model, opt

    build = build or wrapped_adamw

    model, opt = build()
    for i, (x, y) in enumerate(batches):
        if i == stop_at:
            model, opt = resume(model, opt, lambda: build(seed=99))
        mean_loss(model, x, y).backward()
        opt.step(num_items=len(y))
        opt.zero_grad()
    return model, opt


class PythonRouteWrapper(fastaccum.AccumulatingOptimizer):
    """A wrapper that hands its fused layers no C++ route, so that they take their Python
    autograd functions (the route of CUDA bf16/fp16 GEMMs and of compiled code) on the CPU
    too."""

    def wgrad_route(self, layer):
        return None


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """Python's cyclic garbage collector stays off inside the block: whatever is freed
    there was freed by reference counting alone, with no cycle waiting for a collection."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
