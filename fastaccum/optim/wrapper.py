"""``fastaccum.wrap``: any ``torch.optim`` optimizer, stepping once per window of K micro-batches.

The wrapper folds each micro-batch's gradients into fp32 accumulators with the fused
``accumulate_`` op (one read per gradient, which also yields the gradient's squared norm
and a non-finite flag), and at the window boundary normalizes, unscales and clips them
with one ``finalize_`` pass before the wrapped optimizer steps.

Normalization. A micro-batch's loss is the mean over its ``num_items`` items, so its
gradient ``g_i`` is the mean of per-item gradients. The window gradient is the mean over
all items: ``G = sum_i n_i g_i / sum_i n_i``. Without ``num_items`` every ``n_i`` is 1 and
micro-batches weigh equally.

Distributed models. With ``model=`` a ``DistributedDataParallel`` or an FSDP2
(``fully_shard``) model, the wrapper also drives gradient synchronization: sync off inside
a window, one reduction per window, item counts summed over ranks. See
:mod:`fastaccum.distributed`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import operator
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.optim import optimizer as torch_optimizer

from fastaccum import _backend
from fastaccum.nn.batchnorm import (
    accum_batchnorms,
    check_window_states,
    end_window,
    load_window_state_dict,
    window_state_dict,
)
from fastaccum.ops import finalize_
from fastaccum.ops.accumulate import (
    GRAD_DTYPES,
    accumulate_unchecked,
    accumulate_wide,
    sumsq_unchecked,
    sumsq_wide,
)
from fastaccum.ops.wgrad import wgrad_accumulate_unchecked
from fastaccum.optim.chained import ChainedOptimizer, add_note
from fastaccum.stats import NoiseScaleTracker, noise_scale_terms, pooled_terms

if TYPE_CHECKING:
    from fastaccum.optim.fused import GroupUpdate

_CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_
BUCKET_BYTES = {"cpu": 2 * 2**20, "default": 25 * 2**20}
"""Gradient bytes ``opt.backward`` holds before folding them into the accumulators, per
device type. CPUs take small buckets: glibc hands a large run of freed memory back to
the kernel, and the next backward then page-faults it in again (measured on the wrapper
suite: 11,800 minor faults per window with 25 MiB buckets, 560 with 2 MiB, 2,600 for the
native loop). GPUs take large ones: the caching allocator keeps freed blocks, and each
fold is a kernel launch."""


# fastaccum's and torch's source folders: warnings point past their frames (an LR scheduler's
# wrapper around opt.step, autograd calling opt.backward's hooks) at the user's line.
_INTERNAL_CODE = tuple(
    os.path.dirname(path) + os.sep for path in (os.path.dirname(__file__), torch.__file__)
)


def _as_int(name: str, value: Any) -> int:
    """``value`` as an int (NumPy and other integer types too).

    Raises:
        TypeError: a bool, or a value that is not an integer.
    """
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def _user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the calling function that points at the
    first frame outside fastaccum and torch."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_CODE):
        frame, level = frame.f_back, level + 1
    return level


def _called_by_distributed_checkpoint(frames: int = 6) -> bool:
    """Whether one of the few frames above the caller belongs to
    ``torch.distributed.checkpoint``, whose ``get_state_dict`` / ``set_state_dict`` treat
    the wrapper as a plain optimizer: they create missing state with a ``step()`` on zero
    gradients at lr 0 and read a ``torch.optim``-format ``state_dict()``."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(frames):
        if frame is None:
            return False
        if frame.f_globals.get("__name__", "").startswith("torch.distributed.checkpoint"):
            return True
        frame = frame.f_back
    return False


def bucket_bytes(device: torch.device) -> int:
    """:data:`BUCKET_BYTES` for tensors on ``device``."""
    return BUCKET_BYTES.get(device.type, BUCKET_BYTES["default"])


def _check_param_dtype(p: torch.Tensor, index: int) -> None:
    if p.dtype == torch.complex32:
        raise TypeError(
            f"parameter {index} (shape {tuple(p.shape)}) is complex32; fastaccum accumulates "
            "float32, bfloat16, float16, float64, complex64 and complex128 parameters"
        )


# Model parameter -> a tensor of its own (accumulator, master, ...).
ParamMap = dict[torch.Tensor, torch.Tensor]

# Parameter dtypes whose accumulators are float64 (taken by torch's foreach ops, not by the
# kernels, which take float32, bfloat16 and float16 gradients).
_WIDE = (torch.float64, torch.complex128)


def _needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` requires a closure (``torch.optim.LBFGS``)."""
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # no signature to read: assume the usual step()
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def _check_wrappable(optimizer: object, what: str) -> None:
    """Raise TypeError unless ``optimizer`` is a ``torch.optim`` optimizer that a window of
    micro-batches can drive (``what`` names it in the message)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"{what} must be a torch.optim.Optimizer (or a list of them), got "
            f"{type(optimizer).__name__}"
        )
    if isinstance(optimizer, AccumulatingOptimizer):
        if optimizer._fused_update:
            raise TypeError(
                f"{what} is a fastaccum.optim.{type(optimizer).__name__}, which accumulates "
                "by itself: use it directly (accum_steps=K), or list it with other "
                "optimizers in fastaccum.wrap([...], K)"
            )
        raise TypeError(f"{what} is already wrapped by fastaccum; wrap the inner optimizer once")
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise TypeError(
            f"{what} is a SparseAdam, which steps on sparse gradients, and fastaccum "
            "accumulates dense ones; use torch.optim.Adam (nn.Embedding(sparse=False)) instead"
        )
    if _needs_closure(optimizer):
        raise TypeError(
            f"{what}: {type(optimizer).__name__}.step needs a closure that re-evaluates the "
            "loss of the whole batch, which a window of micro-batches cannot give; use it "
            "without fastaccum, on a batch that fits"
        )


def _check_dense_embeddings(model: torch.nn.Module, param_ids: set[int]) -> None:
    """Raise TypeError for an ``nn.Embedding``/``nn.EmbeddingBag`` built with
    ``sparse=True`` whose weight is among ``param_ids``: its gradients are sparse."""
    for name, module in model.named_modules():
        sparse = isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and module.sparse
        if sparse and id(module.weight) in param_ids:
            raise TypeError(
                f"{name or 'model'} is an {type(module).__name__} with sparse=True, whose "
                "gradients are sparse, and fastaccum accumulates dense ones; build it with "
                "sparse=False (the default)"
            )


def _join_fused_members(
    members: Sequence[object], accum_steps: object
) -> tuple[list[object], list[AccumulatingOptimizer]]:
    """``members`` with each fused fastaccum class (``fastaccum.optim.SGD/Adam/AdamW``)
    replaced by the ``torch.optim`` optimizer it holds, and those fused optimizers, whose
    kernels then update their parameters at the list's window boundary.

    Raises:
        ValueError: a fused member holds a partial window, already joined a list, was
            built with options that belong to the list's wrapper (``model``,
            ``max_grad_norm``, ``scaler``, ``activations``, ``master_weights``), or with another
            ``accum_steps`` than 1 or the list's. Nothing is changed then.
    """
    out: list[object] = []
    fused: list[AccumulatingOptimizer] = []
    for i, member in enumerate(members):
        if not (isinstance(member, AccumulatingOptimizer) and member._fused_update):
            out.append(member)
            continue
        what = f"optimizers[{i}] ({type(member).__name__})"
        if member._joined:
            raise ValueError(f"{what} already joined another fastaccum.wrap([...])")
        if member.micro_step:
            raise ValueError(
                f"{what} holds a partial window of {member.micro_step} micro-batch(es); "
                "flush() it before it joins a list"
            )
        for name in ("model", "max_grad_norm", "scaler", "activations", "master_weights"):
            if getattr(member, name) not in (None, False):
                raise ValueError(
                    f"{what} was built with {name}=; in a list the window is the wrapper's: "
                    f"pass {name}= to fastaccum.wrap([...], K, {name}=...) instead"
                )
        if member.accum_steps not in (1, accum_steps):
            raise ValueError(
                f"{what} was built with accum_steps={member.accum_steps}, and the list is "
                f"wrapped with accum_steps={accum_steps}; leave it out of the member"
            )
        out.append(member.optimizer)
        fused.append(member)
    return out, fused


def _check_num_items(num_items: object) -> float | None:
    if num_items is None:
        return None
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(
                f"num_items must be a number, got a tensor of shape {tuple(num_items.shape)}"
            )
        num_items = num_items.item()
    elif type(num_items).__module__ == "numpy" and getattr(num_items, "ndim", None) == 0:
        num_items = num_items.item()  # type: ignore[attr-defined]  # (NumPy scalar, 0-d array)
    if isinstance(num_items, bool) or not isinstance(num_items, (int, float)):
        raise TypeError(
            "num_items must be a positive number (int, float, or a one-element tensor or "
            f"NumPy scalar), got {type(num_items).__name__}"
        )
    if not math.isfinite(num_items) or num_items <= 0:
        raise ValueError(f"num_items must be > 0, got {num_items}")
    return float(num_items)


class _FoldHook:
    """The post-accumulate-grad hook ``opt.backward`` puts on every parameter. It reaches the
    wrapper through a weak reference: the parameters outlive a dropped optimizer, and autograd
    keeps hooks where the garbage collector cannot see them, so a strong one would keep the
    wrapper, its accumulators and the optimizer state alive for as long as the model lives,
    and forever once both are dropped."""

    __slots__ = ("_opt",)
    fastaccum_fold = True  # not a user's hook: fused layers still route (nn._sink)

    def __init__(self, opt: AccumulatingOptimizer) -> None:
        self._opt = weakref.ref(opt)

    def __call__(self, p: torch.Tensor) -> None:
        opt = self._opt()
        if opt is not None:
            opt._fold_hook(p)


def _real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor's real view (a trailing dimension of 2); a real tensor itself."""
    return torch.view_as_real(t) if t.is_complex() else t


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when contiguous; else ``t`` with its dimensions permuted into memory
    order (outermost stride first), which is contiguous for a dense tensor in another
    memory format (channels_last): the same memory, for the elementwise kernels."""
    if t.is_contiguous():
        return t
    return t.permute(sorted(range(t.dim()), key=t.stride, reverse=True))


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the elements of ``a`` and ``b`` lie in the same memory order (equal shapes,
    equal strides wherever a dimension has more than one element)."""
    return a.shape == b.shape and all(
        n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True)
    )


def _is_plain_optimizer_state(state_dict: object, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``state_dict`` is a ``torch.optim.Optimizer.state_dict()`` (not a wrapper's),
    or, when ``optimizer`` is a chain, a ``ChainedOptimizer.state_dict()``."""
    if not isinstance(state_dict, dict) or "fastaccum" in state_dict:
        return False
    if isinstance(optimizer, ChainedOptimizer) and "optimizers" in state_dict:
        return True
    return {"state", "param_groups"} <= set(state_dict)


def _remove_handles(handles: list[Any]) -> None:
    """Take a dropped wrapper's hooks off its parameters."""
    for handle in handles:
        handle.remove()


class _ScalerUpdateGuard:
    """``update`` of a GradScaler that a wrapper drives (``scaler=``): the wrapper updates the
    scale once per window, so a ``scaler.update()`` left in the loop would reach torch's bare
    "No inf checks were recorded prior to update." assertion. This raises a RuntimeError
    that says what to do instead; every call torch accepts (the wrapper's own, with
    ``new_scale``, or one after ``scaler.step`` of another optimizer) goes through unchanged.
    A module-level class rather than a closure, so that the scaler still pickles.
    """

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler

    def __call__(self, new_scale: float | torch.Tensor | None = None) -> None:
        scaler = self.scaler
        states = getattr(scaler, "_per_optimizer_states", {})
        recorded = any(state.get("found_inf_per_device") for state in states.values())
        if new_scale is None and scaler.is_enabled() and not recorded:
            raise RuntimeError(
                "scaler.update() was called on a GradScaler that a fastaccum optimizer "
                "drives (created with scaler=): it updates the scale itself, once per "
                "window at the boundary, so leave scaler.update() out of the loop. To step "
                "and update the scaler yourself on every micro-batch instead, create the "
                "optimizer without scaler= and call scaler.step(opt); scaler.update(). "
                "Nothing changed: the scale, the window's gradients and the optimizer are "
                "as they were"
            )
        type(scaler).update(scaler, new_scale)

    @staticmethod
    def install(scaler: torch.amp.GradScaler) -> None:
        """Guard ``scaler.update`` (once per scaler, however many wrappers share it)."""
        if not isinstance(vars(scaler).get("update"), _ScalerUpdateGuard):
            scaler.update = _ScalerUpdateGuard(scaler)  # type: ignore[method-assign]


class _FromWrapped:
    """An attribute of the wrapper that is the wrapped optimizer's attribute of the same
    name, read at every access (``param_groups``, ``state``). The wrapped optimizer's own
    ``load_state_dict`` (called directly, or by torch.distributed.checkpoint) replaces
    both objects, and a wrapper holding the old ones would drive learning rates that no
    longer reach it. Before the wrapped optimizer is set (in ``Optimizer.__init__``) the
    wrapper keeps its own."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.own = name, f"_own_{name}"

    def __get__(self, wrapper: Any, owner: type | None = None) -> Any:
        if wrapper is None:
            return self
        inner = wrapper.__dict__.get("optimizer")
        return wrapper.__dict__[self.own] if inner is None else getattr(inner, self.name)

    def __set__(self, wrapper: Any, value: Any) -> None:
        inner = wrapper.__dict__.get("optimizer")
        if inner is None:
            wrapper.__dict__[self.own] = value
        else:
            setattr(inner, self.name, value)


class AccumulatingOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that steps its wrapped optimizer once per window.

    Create it with :func:`wrap`. It shares ``param_groups`` and ``state`` with the wrapped
    optimizer, so LR schedulers built on it drive the wrapped optimizer's learning rates.
    Step hooks (``register_step_pre_hook``/``register_step_post_hook``) run around each
    window's update, not on every micro-step.
    """

    # Whether _apply_and_step runs the wrapped optimizer's own step(), which runs torch's
    # global step hooks; subclasses that update the parameters themselves set it False.
    _steps_wrapped_optimizer = True
    # Whether the class updates its parameters with a fused kernel that a list's wrapper
    # can run for it (fastaccum.optim.SGD/Adam/AdamW: see _fused_window_update).
    _fused_update = False
    # The list's wrapper this optimizer joined, which steps it (weakly: once that wrapper is
    # dropped, this optimizer is free again), or None.
    _joined_by: weakref.ref | None = None
    # Why this optimizer cannot take micro-batches of its own (a fused class over sharded
    # parameters without model=, which only a list's wrapper can step), or None.
    _unusable: str | None = None

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        accum_steps: int,
        *,
        model: torch.nn.Module | None = None,
        max_grad_norm: float | None = None,
        accum_dtype: torch.dtype = torch.float32,
        master_weights: bool = False,
        scaler: torch.amp.GradScaler | None = None,
        reduce_scatter_every_micro_step: bool = False,
        activations: Any = None,
        fused_update: bool | None = None,
    ) -> None:
        fused_members: list[AccumulatingOptimizer] = []
        if isinstance(optimizer, (list, tuple)):
            members, fused_members = _join_fused_members(optimizer, accum_steps)
            # ChainedOptimizer checks the list; it changes no member
            optimizer = ChainedOptimizer(cast(list[torch.optim.Optimizer], members))
        if isinstance(optimizer, ChainedOptimizer):
            for i, member in enumerate(optimizer.optimizers):
                _check_wrappable(member, f"optimizers[{i}]")
        else:
            _check_wrappable(optimizer, "optimizer")
        inner = cast(torch.optim.Optimizer, optimizer)  # checked just above
        accum_steps = _as_int("accum_steps", accum_steps)
        if not isinstance(master_weights, bool):
            raise TypeError(
                f"master_weights must be True or False, got {type(master_weights).__name__}"
            )
        if accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
        if max_grad_norm is not None and (
            isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
        ):
            raise TypeError(
                "max_grad_norm must be a positive finite number or None, got "
                f"{type(max_grad_norm).__name__} {max_grad_norm!r}"
            )
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(
                f"max_grad_norm must be a positive finite number or None, got {max_grad_norm}"
            )
        if fused_update is not None and not isinstance(fused_update, bool):
            raise TypeError(
                f"fused_update must be None, True or False, got {type(fused_update).__name__}"
            )
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        if activations is not None:
            from fastaccum.memory.policy import ActivationPolicy

            if not isinstance(activations, ActivationPolicy):
                raise TypeError(
                    "activations must be a fastaccum.ActivationPolicy, got "
                    f"{type(activations).__name__}"
                )
            if model is None:
                raise ValueError(
                    "activations= applies the policy to the model's forward passes: pass model= too"
                )
        params = [p for g in inner.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            _check_param_dtype(p, i)
        if accum_dtype != torch.float32:
            mismatched = [p for p in params if p.dtype != accum_dtype]
            if accum_dtype not in (torch.bfloat16, torch.float16) or mismatched:
                raise ValueError(
                    "accum_dtype must be torch.float32 or the parameters' own dtype, got "
                    f"{accum_dtype}"
                )
        self._names = self._param_names(params, model)
        if model is not None:
            _check_dense_embeddings(model, {id(p) for p in params})

        # Optimizer.__init__ sets up the hook dictionaries and the step patching that
        # schedulers and profilers rely on; its own copies of the groups are then left
        # behind: param_groups and state read the wrapped optimizer's (see below).
        super().__init__(inner.param_groups, inner.defaults)
        self.optimizer: torch.optim.Optimizer = inner
        self.model = model
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.accum_dtype = accum_dtype
        self.scaler = scaler
        if scaler is not None:
            _ScalerUpdateGuard.install(scaler)
        self.master_weights = bool(master_weights)
        # The fused update that stands in for a torch.optim SGD/Adam/AdamW's own step()
        # at the boundary, in windows where it gives the same update (see
        # fastaccum.optim.fused.auto_fusable); None: torch's step() always runs.
        self.fused_update = fused_update
        self._auto_step: GroupUpdate | None = None
        # The same for the torch.optim members of a list (fused classes excluded: their
        # own kernels run for them): (member, its update).
        self._auto_members: list[tuple[torch.optim.Optimizer, GroupUpdate]] = []
        if fused_update is not False and not self._fused_update:
            from fastaccum.optim.fused import auto_update

            if isinstance(inner, ChainedOptimizer):
                joined = {id(m.optimizer) for m in fused_members}
                for member in inner.optimizers:
                    update = auto_update(member)
                    if update is not None and id(member) not in joined:
                        self._auto_members.append((member, update))
            else:
                self._auto_step = auto_update(inner)
        self._window_fused = False  # whether the current boundary runs _auto_step
        # Whether any parameter of the boundary in progress went through a torch.optim
        # step(); and, for the last applied window, the opposite (stats()["fused_update"]).
        self._torch_stepped = False
        self._last_update_fused: bool | None = None

        # The model's parameters, in param-group order; gradients are read from these.
        self._params: list[torch.Tensor] = params
        self._param_ids = {id(p) for p in params}
        # model parameter -> fp32 master the wrapped optimizer updates (master_weights)
        self._masters: dict[torch.Tensor, torch.Tensor] = {}
        # model parameter -> its version counter when its master was last in step with it:
        # a later in-place change (load_state_dict, a copy_ under no_grad) moves it.
        self._master_versions: dict[torch.Tensor, int] = {}
        if self.master_weights:
            self._install_masters()
        self._accums: dict[torch.Tensor, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._hooks_active = False
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_bytes = 0
        self._bucket_limit = bucket_bytes(self._params[0].device) if self._params else 0
        self._accum_steps = accum_steps
        self._dist = None
        # The control tensor of fastaccum::linear_wgrad / embedding_wgrad (see
        # _attach_wgrad_sinks) and the (weight, bias) of the layer behind each of its slots.
        self._wgrad_control: torch.Tensor | None = None
        self._wgrad_layers: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._sinks_stale = False  # fused layers to attach at the next window start
        self._reset_window()
        self._attach_wgrad_sinks(model)
        self._skipped_windows = 0
        self._windows = 0
        self._items_seen = 0.0
        self._last_norm: float | None = None
        self._last_micro_sumsq: list[float] = []
        self._last_fused: tuple[float, float] | None = None  # see _finish_window
        self._pooled: list[float] | None = None  # DDP/FSDP2: see _finish_window
        # ids of the parameters a fused-wgrad layer has written in any window: their
        # ordinary gradients (a tied weight's other use) stay out of the per-micro-batch
        # norms, since the first micro-batch's accumulator read measures them whole.
        self._fused_seen: set[int] = set()
        self._windows_since_inf = 0
        # Gradient noise scale from the per-micro-batch and window norms (fastaccum.stats);
        # its ``beta`` (EMA factor per window) may be changed.
        self.noise_scale_tracker = NoiseScaleTracker()
        self._last_window_size: float | None = None
        self._warned_divided = False
        self._checked_distributed = False  # at the first step(): see step()
        self._window_lrs: list[object] | None = None  # the learning rates at window start
        self._warned_lr = False
        from fastaccum.distributed import attach

        self._dist = attach(self, model, reduce_scatter_every_micro_step)
        self._sync_next()
        # Every forward pass of the model runs inside the activation policy's saved-tensor
        # pipeline (attached last: nothing above can fail after it).
        self.activations = activations
        self._activation_handle = None if activations is None else activations.attach(model)
        if self._activation_handle is not None:  # a dropped wrapper takes its policy along
            weakref.finalize(self, self._activation_handle.remove)
        # Fused classes given in a list: their kernels update their parameters at this
        # wrapper's boundary, and they take no micro-batches of their own any more.
        self._fused_members = fused_members
        # param groups taken in so far (see _adopt_new_groups)
        self._group_count = len(self.param_groups)
        for member in fused_members:
            member._joined_by = weakref.ref(self)
            member._accums.clear()  # its window is empty: free its (zero) accumulators

    def __getstate__(self) -> dict[str, Any]:
        """Refuse to be copied or pickled (``copy.deepcopy(opt)``, ``torch.save(opt)``).

        Raises:
            TypeError: always. The wrapper's hooks, accumulators and masters belong to
                the model's parameters, which a copy would not share.
        """
        raise TypeError(
            f"a fastaccum {type(self).__name__} cannot be copied or pickled: its hooks, "
            "accumulators and masters belong to the model's parameters. Save "
            "opt.state_dict() (torch.save) and load it into a new wrapper of the new model "
            "with opt.load_state_dict()"
        )

    # ------------------------------------------------------------------ properties

    @property
    def _joined(self) -> bool:
        """Whether a live list's wrapper steps this (fused) optimizer."""
        return self._joined_by is not None and self._joined_by() is not None

    # The wrapped optimizer's, read at every access (see _FromWrapped).
    param_groups = _FromWrapped()
    state = _FromWrapped()

    @property
    def accum_steps(self) -> int:
        """Micro-batches per window (K). Settable between micro-batches, for a batch-size
        schedule: see the setter."""
        return self._accum_steps

    @accum_steps.setter
    def accum_steps(self, value: int) -> None:
        """Change K, e.g. to ramp the batch size up during training.

        The window in progress closes once it holds ``value`` micro-batches; its gradient
        is normalized by what it held, as every window's is. Set it between micro-batches
        (after ``step()``, before the next forward); at a boundary (``step()`` returned
        True, ``micro_step == 0``) any ``value >= 1`` is taken. The new K is saved by
        :meth:`state_dict` and restored by :meth:`load_state_dict`.

        Raises:
            TypeError: ``value`` is not an int.
            ValueError: ``value < 1``, or ``value <= micro_step``: the window already holds
                that many micro-batches (call ``flush()`` to step on them first).
            RuntimeError: a micro-batch is in flight (``opt.backward()`` or
                ``loss.backward()`` ran and its ``step()`` has not). Nothing changes when
                one of these is raised.
        """
        value = _as_int("accum_steps", value)
        if value < 1:
            raise ValueError(f"accum_steps must be >= 1, got {value}")
        if value == self._accum_steps:
            return
        held = any(p.grad is not None for p in self._params)
        if self._hook_weight is not None or held:
            what = "opt.backward()" if self._hook_weight is not None else "loss.backward()"
            raise RuntimeError(
                f"accum_steps was set between {what} and opt.step(): that micro-batch's "
                "place in its window is already decided. Call opt.step() first, then set "
                "accum_steps before the next forward"
            )
        if value <= self._micro_step:
            raise ValueError(
                f"accum_steps={value}, but the window in progress already holds "
                f"{self._micro_step} micro-batch(es); set it to at least "
                f"{self._micro_step + 1}, or call opt.flush() to step on those first"
            )
        self._accum_steps = value
        self._sync_next()

    @property
    def micro_step(self) -> int:
        """Micro-batches folded into the current window so far (0 right after a step)."""
        return self._micro_step

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the wrapped optimizer; its parameters are accumulated too.

        Raises:
            TypeError: a complex32 parameter, or a float64 or complex one under DDP or
                FSDP2 (and torch.optim's own errors). Nothing is added then.
        """
        if not hasattr(self, "_params"):
            # called from Optimizer.__init__, before the wrapper is set up
            super().add_param_group(param_group)
            return
        self._check_usable("add_param_group()", micro_batch=False)
        if isinstance(self.optimizer, ChainedOptimizer):
            raise RuntimeError(
                "this wrapper steps several optimizers and cannot tell which one a new param "
                "group belongs to; add the group to that optimizer and wrap again (nothing "
                "was added)"
            )
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if isinstance(params, torch.Tensor):
            params = [params]
        elif params is not None and not isinstance(params, set):
            params = list(params)
            param_group = {**param_group, "params": params}
        self._check_group_params([p for p in params or [] if isinstance(p, torch.Tensor)])
        super().add_param_group(param_group)  # appends to the shared param_groups list
        self._register_group(self.param_groups[-1])
        self._group_count = len(self.param_groups)
        self._refresh_wgrad_sinks()  # fused layers of the new parameters

    def _check_group_params(self, params: list[torch.Tensor]) -> None:
        """Raise TypeError for a parameter of a new group this wrapper cannot take."""
        for i, p in enumerate(params):
            _check_param_dtype(p, i)
            if self._dist is not None:
                from fastaccum.distributed import check_reducible

                check_reducible(p, f"param {i} of the new group")

    def _register_group(self, group: dict[str, Any]) -> None:
        """Accumulate ``group``'s parameters from now on (masters made where wanted)."""
        known = self._param_ids
        for i, p in enumerate(group["params"]):
            if id(p) not in known:
                self._params.append(p)
                self._param_ids.add(id(p))
                self._names.setdefault(
                    id(p), f"param {len(self._params) - 1} (shape {tuple(p.shape)})"
                )
                if self.master_weights:
                    self._install_master(group, i)

    def _adopt_new_groups(self) -> None:
        """Take in the param groups added to the wrapped optimizer itself since wrapping
        (``inner.add_param_group(...)``, a member's under a list), as :meth:`add_param_group`
        would have: otherwise their gradients would reach torch's step unaccumulated, or
        no update at all.

        Raises:
            TypeError, ValueError: a new group's parameter is one this wrapper cannot take
                (a fused class: not float32, or not dense); nothing is taken in (the group
                stays in the optimizer, and each step says so).
        """
        groups = self.param_groups
        for index in range(self._group_count, len(groups)):
            params = list(groups[index]["params"])
            try:
                self._check_group_params(params)
            except (TypeError, ValueError) as err:
                raise type(err)(
                    f"param group {index}, added to the wrapped optimizer after wrapping: "
                    f"{err}. Remove it from the optimizer, or add it through the wrapper "
                    "after fixing it"
                ) from None
        for index in range(self._group_count, len(groups)):
            self._register_group(groups[index])
        self._group_count = len(groups)
        self._refresh_wgrad_sinks()  # fused layers of the new parameters

    # ------------------------------------------------------------------ setup helpers

    @staticmethod
    def _param_names(params: list[torch.Tensor], model: torch.nn.Module | None) -> dict[int, str]:
        if model is None:
            return {id(p): f"param {i} (shape {tuple(p.shape)})" for i, p in enumerate(params)}
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        names = {id(p): n for n, p in model.named_parameters()}
        for i, p in enumerate(params):
            if id(p) not in names:
                raise ValueError(
                    f"the optimizer's parameter {i} (shape {tuple(p.shape)}) is not a parameter "
                    "of model; pass the model whose parameters the optimizer updates"
                )
        return names

    def _install_masters(self) -> None:
        for group in self.param_groups:
            for i in range(len(group["params"])):
                self._install_master(group, i)

    def _install_master(self, group: dict[str, Any], i: int) -> None:
        # The wrapped optimizer is pointed at an fp32 copy; the model keeps its low-precision
        # parameter, which is refreshed from the master after every step.
        p = group["params"][i]
        if p.dtype not in (torch.bfloat16, torch.float16):
            return
        master = p.detach().float().clone().requires_grad_(p.requires_grad)
        self._masters[p] = master
        self._master_versions[p] = p._version
        # The group first: a chain's state files an entry under the member holding it.
        group["params"][i] = master
        if p in self.state:
            # State from steps taken before wrapping follows the parameter to fp32, as
            # torch's load_state_dict casts floating state (all but "step") to the param's.
            self.state[master] = {
                key: value.float()
                if key != "step" and torch.is_tensor(value) and value.is_floating_point()
                else value
                for key, value in self.state.pop(p).items()
            }

    def _reset_window(self) -> None:
        self._micro_step = 0
        self._close_after = False
        self._weights: list[float] = []
        self._uses_num_items: bool | None = None
        self._by_backward: bool | None = None  # the last micro-batch's path: opt.backward
        self._window_bad: list[torch.Tensor] = []
        # Gradient sums of squares of every fold of the window and the micro-step each
        # belongs to: summed per micro-batch once, at the boundary, not on every step.
        self._sumsq_parts: list[torch.Tensor] = []
        self._sumsq_micro: list[int] = []
        # ids of the parameters that received a gradient in this window: only these step,
        # as torch.optim skips parameters whose .grad is None.
        self._touched: set[int] = set()
        # ids of the parameters whose gradients went into the per-micro-batch norms, and
        # of those fused-wgrad layers wrote, in this window; the squared norm of the fused
        # set's first micro-batch gradient (their one per-micro-batch norm).
        self._measured_ids: set[int] = set()
        self._fused_ids: set[int] = set()
        self._fused_first: torch.Tensor | None = None
        if self._sinks_stale:
            self._sinks_stale = False
            self._attach_wgrad_sinks(self.model)
        if self._wgrad_control is not None:
            self._wgrad_control.zero_()
        if self._dist is not None:
            self._dist.start_window()
        self._start_micro_step()

    def _start_micro_step(self) -> None:
        # (ids of params folded by one accumulate_ call, that call's accumulator sum of
        # squares) for the current micro-step: at the boundary they give the window norm
        # without re-reading the accumulators.
        self._covers: list[tuple[set[int], torch.Tensor | None]] = []
        self._fused_this_step = False
        self._hook_weight: float | None = None

    def window_accums(self) -> dict[torch.Tensor, torch.Tensor]:
        """Model parameter -> accumulator, for the parameters that received a gradient in
        the current window (the ones a boundary steps). Subclasses that replace
        :meth:`_apply_and_step` read the window from here."""
        return {p: acc for p, acc in self._accums.items() if id(p) in self._touched}

    def _accum_spec(self, p: torch.Tensor) -> tuple[torch.Size, torch.dtype]:
        """Shape and dtype of ``p``'s accumulator: fp32 (``accum_dtype``, or the
        parameter's own low precision), float64 for float64 parameters; a complex
        parameter's is that of its real view. Its memory format is the parameter's (a
        distributed model's accumulators are contiguous: they are reduced as one flat
        buffer)."""
        real = p.dtype.to_real()
        if real == torch.float64 or self.accum_dtype != torch.float32:
            dtype = real
        else:
            dtype = torch.float32
        local = p if self._dist is None else self._dist.local(p)
        shape = (*local.shape, 2) if p.is_complex() else local.shape
        return torch.Size(shape), dtype

    def _accum_for(self, p: torch.Tensor) -> torch.Tensor:
        acc = self._accums.get(p)
        if acc is None:
            shape, dtype = self._accum_spec(p)
            if self._dist is None:  # channels_last stays channels_last (not if not dense)
                acc = torch.zeros_like(_real(p.detach()), dtype=dtype)
            else:
                acc = torch.zeros(shape, dtype=dtype, device=p.device)
            self._accums[p] = acc
        elif (p.dtype in _WIDE) != (acc.dtype == torch.float64):
            acc = self._retype_accum(p, acc)
        return acc

    def _retype_accum(self, p: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        """A new accumulator for ``p``, whose dtype moved to or from float64 after its
        accumulator was made (``model.double()`` or ``.float()`` after some windows).
        Allowed where torch.optim would step such a parameter: between windows (nothing
        of ``p`` is in the current one) and while the optimizer holds no state for it.

        Raises:
            TypeError: ``p`` is in the current window, or the optimizer already has state
                for it, or the new dtype is one this wrapper cannot take (fused classes:
                float32 only; DDP and FSDP2: no float64). Nothing is changed.
        """
        name = self._names[id(p)]
        was = "float64" if acc.dtype == torch.float64 else "float32, bfloat16 or float16"
        why = None
        if id(p) in self._touched:
            why = f"the current window already holds its {was} gradients"
        elif self.optimizer.state.get(self._masters.get(p, p)):
            why = (
                "the optimizer already holds state for it in its old dtype (torch.optim's "
                "own step fails on that too)"
            )
        if why is not None:
            raise TypeError(
                f"{name} is {p.dtype} now, but was {was} when fastaccum made its accumulator; "
                f"{why}. Cast the model before building the optimizer, or build a new "
                "optimizer and wrapper after casting"
            )
        self._check_new_dtype(p, name)
        del self._accums[p]  # zeros (not in the window): made again for the new dtype
        return self._accum_for(p)

    def _check_new_dtype(self, p: torch.Tensor, name: str) -> None:
        """Raise TypeError when ``p``'s new dtype is one this wrapper does not take."""
        if self._dist is not None:
            from fastaccum.distributed import check_reducible

            check_reducible(p, name)

    def _weight(self, num_items: object) -> float:
        value = _check_num_items(num_items)
        uses = value is not None
        if self._uses_num_items is not None and uses != self._uses_num_items:
            have = "with" if self._uses_num_items else "without"
            raise ValueError(
                "num_items must be given on every micro-batch of a window or on none; this "
                f"window already has {self._micro_step} micro-batch(es) {have} it"
            )
        return 1.0 if value is None else value

    def _fold(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], weight: float) -> None:
        """accumulate_ the (param, grad) pairs, one fused call per device."""
        by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p, g in pairs:
            if g.layout != torch.strided:
                raise TypeError(
                    f"{self._names[id(p)]} has a {g.layout} gradient; fastaccum needs dense "
                    "gradients (an nn.Embedding needs sparse=False)"
                )
            by_device.setdefault(g.device, []).append((p, g))
        local = (lambda t: t) if self._dist is None else self._dist.local
        for group in by_device.values():
            accums = [self._accum_for(p) for p, _ in group]
            wide = [a.dtype == torch.float64 for a in accums]
            if not any(wide):
                self._fold_group(group, accums, weight, local)
                continue
            # float64 accumulators (float64 and complex128 parameters) take torch's foreach
            # ops, after the kernel call, which validates, has run on the others.
            for is_wide in (False, True):
                part = [i for i, w in enumerate(wide) if w == is_wide]
                if part:
                    self._fold_group(
                        [group[i] for i in part], [accums[i] for i in part], weight, local
                    )
        for p, _ in pairs:
            p.grad = None  # folded: free it, so a later backward cannot fold it twice

    def _fold_group(
        self,
        group: list[tuple[torch.Tensor, torch.Tensor]],
        accums: list[torch.Tensor],
        weight: float,
        local: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """One fused accumulate_ call (all accumulators float64, or none): complex
        gradients go in as their real views, like their accumulators."""
        # The lists are built here from parameters and their own gradients, so the
        # Python-side checks are skipped; the op still validates before it writes.
        grads = [_real(local(g)) for _, g in group]
        for i, (g, acc) in enumerate(zip(grads, accums, strict=True)):
            if acc.is_contiguous():
                grads[i] = g.contiguous()
            else:  # e.g. channels_last: both go in memory order, with no copy
                if not _same_layout(g, acc):
                    g = torch.empty_like(acc, dtype=g.dtype).copy_(g)
                grads[i], accums[i] = _memory_order(g), _memory_order(acc)
        if accums[0].dtype == torch.float64:
            grad_sumsq, bad = accumulate_wide(accums, grads, weight)
            accum_sumsq = None  # no free by-product here: read once, at the boundary
        else:
            res = accumulate_unchecked(accums, grads, weight)
            grad_sumsq, bad, accum_sumsq = res.grad_sumsq, res.found_nonfinite, res.accum_sumsq
        ids = {id(p) for p, _ in group}
        self._covers.append((ids, accum_sumsq))
        self._touched |= ids
        seen = self._fused_seen
        fused = [i for i, (p, _) in enumerate(group) if id(p) in seen] if seen else []
        if fused and accum_sumsq is not None:  # (float64 ones are never fused)
            # integer indexing: views, no index tensor copied to the device
            per_tensor = res.grad_sumsq_per_tensor
            grad_sumsq = grad_sumsq - sum(per_tensor[i] for i in fused)
            ids = ids - {id(group[i][0]) for i in fused}
        self._measured_ids |= ids
        self._sumsq_parts.append(grad_sumsq)
        self._sumsq_micro.append(self._micro_step)
        self._window_bad.append(bad)

    # ------------------------------------------------------------------ the loop

    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, *, num_items: float | None = None
    ) -> bool:
        """Fold this micro-batch's gradients in; step the wrapped optimizer at the boundary.

        Args:
            closure: optional; re-evaluates the loss with gradients, as in torch.optim.
            num_items: items (tokens, samples) this micro-batch's mean loss was taken over.
                It weights the micro-batch so that the window gradient is the mean over all
                items. Give it on every micro-batch of a window or on none.

        Returns:
            True when the wrapped optimizer stepped (last micro-batch of a window with
            finite gradients), else False.

        Raises:
            ValueError: ``num_items <= 0``, or given on only some micro-batches of a window.
            RuntimeError: no parameter has a gradient (no backward on this micro-batch).
            TypeError: the model was cast to or from float64 after wrapping, and the
                current window or the optimizer's state holds the old dtype.
            Nothing is folded or changed when it raises.
        """
        self._check_usable("step()")
        if not self._checked_distributed:
            self._checked_distributed = True
            if self._dist is None:
                from fastaccum.distributed import warn_without_distributed_model

                warn_without_distributed_model(self, self.model, _user_stacklevel() + 1)
        if not self.optimizer.state and _called_by_distributed_checkpoint():
            # torch.distributed.checkpoint creating missing state (zero gradients, lr 0):
            # that is the wrapped optimizer's step, not a micro-batch of the window.
            self.optimizer.step()
            return False
        self._check_not_unscaled()
        if closure is not None:
            with torch.enable_grad():
                closure()
        self._collect_wgrad_hits()
        # FSDP2 off the boundary holds gradients itself: step() then finds none.
        expected = self._dist is None or self._dist.grads_expected(self._at_boundary())
        by_backward = self._hook_weight is not None
        if self._hook_weight is not None:  # opt.backward() already folded this micro-batch
            weight, uses = self._hook_weight, self._hook_uses
            if num_items is not None and _check_num_items(num_items) != weight:
                raise ValueError(
                    f"num_items={num_items} differs from the {weight} given to opt.backward()"
                )
            leftovers = [(p, p.grad) for p in self._params if p.grad is not None]
            if leftovers:
                self._fold(leftovers, self._fold_weight(weight))
            if expected and not self._covers and not self._fused_this_step:
                self._hook_weight = None
                raise RuntimeError(
                    "opt.backward(loss) produced no gradient for any wrapped parameter; check "
                    "that loss depends on the parameters the optimizer updates"
                    + self._replaced_params_hint()
                )
        else:
            weight, uses = self._weight(num_items), num_items is not None
            if self._dist is not None:
                self._dist.check_step(uses)
            pairs = [(p, p.grad) for p in self._params if p.grad is not None]
            if expected and not pairs:
                raise RuntimeError(
                    "step() found no gradients: call loss.backward() or opt.backward(loss) on "
                    "this micro-batch before opt.step()" + self._replaced_params_hint()
                )
            if pairs:
                self._fold(pairs, self._fold_weight(weight))
        if self._dist is not None:
            self._dist.after_micro_step()
        self._uses_num_items = uses
        self._by_backward = by_backward
        self._weights.append(weight)
        self._watch_lr()
        self._micro_step += 1
        if self._micro_step >= self._accum_steps or self._close_after:
            return self._finish_window()
        local = self._dist is None or not self._dist.sharded  # DDP's stay local until the end
        if self._micro_step == 1 and local and self._fused_set():
            self._note_fused_first(weight)
        elif self._micro_step == 1 and self._dist is not None and not local and weight > 0.0:
            first = self._dist.first_micro_sumsq()  # FSDP2's unsharded gradient of it
            if first is not None:
                self._fused_first = first / (weight * weight)
        self._start_micro_step()
        self._sync_next()
        return False

    # torch.optim.Optimizer wraps step() to run the step hooks around every call; here most
    # calls only fold a micro-batch, so the hooks run around the update instead
    # (_run_step_hooks, from _finish_window).
    step.hooked = True  # type: ignore[attr-defined]

    def _watch_lr(self) -> None:
        """Warn once when a (Python number) learning rate changes between micro-batches of
        one window: the update uses only the value at the boundary, and the usual cause is
        an LR scheduler stepped on every micro-batch instead of on every window."""
        lrs = [group.get("lr") for group in self.param_groups]
        if self._micro_step == 0 or self._window_lrs is None:
            self._window_lrs = lrs
            return
        if self._warned_lr:
            return
        for i, (now, then) in enumerate(zip(lrs, self._window_lrs, strict=False)):
            numbers = all(type(v) in (float, int) for v in (now, then))
            if numbers and now != then:
                self._warned_lr = True
                warnings.warn(
                    f"param group {i}'s learning rate changed from {then} to {now} in the "
                    f"middle of a window (micro-batch {self._micro_step + 1} of "
                    f"{self._accum_steps}); the update uses only its value at the boundary. "
                    "If an LR scheduler is stepped on every micro-batch, step it only when "
                    "opt.step() returns True, or it runs accum_steps times too fast",
                    RuntimeWarning,
                    stacklevel=_user_stacklevel(),
                )
                return

    def _check_not_unscaled(self) -> None:
        """Raise RuntimeError when ``scaler.step(opt)`` or ``scaler.unscale_(opt)`` already
        unscaled this micro-batch's gradients for the scaler this wrapper unscales with
        itself: folding them would unscale them twice."""
        if self.scaler is None or not self.scaler.is_enabled():
            return
        self._check_scaler_used()
        states = getattr(self.scaler, "_per_optimizer_states", None)
        state = states.get(id(self)) if isinstance(states, dict) else None
        stage = None if state is None else getattr(state.get("stage"), "name", None)
        if stage not in (None, "READY"):
            # The scaler's record of that call goes, so that the corrected loop's next
            # opt.step() is not refused for it too.
            del cast(dict, states)[id(self)]
            raise RuntimeError(
                "scaler.step(opt) or scaler.unscale_(opt) was called on a wrapper created "
                "with scaler=: the wrapper holds the scale for the window and unscales once "
                "at its boundary, so this micro-batch's gradients would be unscaled twice. "
                "Call opt.step() and leave scaler.step/unscale_/update to the wrapper, or "
                "wrap without scaler= to let scaler.step(opt) unscale every micro-batch. "
                "Nothing was folded; the gradients were already unscaled by the scaler: "
                "call opt.zero_grad() and redo this micro-batch"
            )

    def _check_scaler_used(self) -> None:
        """Raise RuntimeError when this wrapper holds an enabled scaler whose scale() was
        never called: the gradients are then unscaled, and dividing them by the scaler's
        initial scale at the boundary would shrink the step by that factor."""
        if self.scaler is None or not self.scaler.is_enabled():
            return
        if getattr(self.scaler, "_scale", True) is None:  # GradScaler creates it in scale()
            raise RuntimeError(
                "this wrapper was created with scaler=, but scaler.scale(loss) was never "
                "called: backward the scaled loss, scaler.scale(loss).backward() or "
                "opt.backward(scaler.scale(loss)); the wrapper unscales at the window "
                "boundary. Nothing was folded"
            )

    def _fold_weight(self, weight: float) -> float:
        # Under FSDP2 opt.backward already put the weight into the gradient (see backward).
        return 1.0 if self._dist is not None and self._dist.weights_in_loss else weight

    def _at_boundary(self) -> bool:
        """Whether the micro-batch in progress (the next one folded) closes the window."""
        return self._micro_step + 1 >= self._accum_steps or self._close_after

    def _sync_next(self) -> None:
        """Set a distributed model's gradient sync for the next forward and backward: on
        only when that micro-batch closes the window."""
        if self._dist is not None:
            self._dist.set_sync(self._at_boundary())

    @contextlib.contextmanager
    def accumulate(self, last: bool = False) -> Iterator[AccumulatingOptimizer]:
        """Context for one micro-batch's forward and backward, for explicit loops.

        On entry it sets the model's gradient sync (DDP's ``require_backward_grad_sync``,
        FSDP2's ``set_requires_gradient_sync``) for this micro-batch: on only when it closes
        the window. The wrapper already does this after every ``step()``, so the context is
        optional; ``last=True`` makes this micro-batch close the window early (the next
        ``step()`` steps on the partial window, with its reduction overlapped with backward
        as a full window's is), e.g. at the end of an epoch. Without a distributed model it
        only marks ``last``.
        """
        self._check_usable("accumulate()")
        if last:
            self._close_after = True
        self._sync_next()
        yield self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the model parameters' ``.grad`` (the accumulators are kept: they hold the
        window). After ``step()`` the gradients are already folded and cleared."""
        for p in [*self._params, *self._masters.values()]:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    # ------------------------------------------------------------------ opt.backward

    def backward(self, loss: torch.Tensor, num_items: float | None = None, **kwargs: Any) -> None:
        """``loss.backward()`` that folds each gradient into its accumulator as soon as
        autograd produces it, then frees it, so that a full set of gradients never sits
        next to the accumulators. Call ``opt.step()`` afterwards as usual.

        If backward itself raises (out of memory, say), the error propagates. When none of
        the micro-batch's gradients had been folded yet, the window is as it was and the
        micro-batch can be retried; otherwise the window is discarded, with a
        RuntimeWarning, since it would hold part of a micro-batch.

        Raises:
            TypeError: ``loss`` is not a tensor.
            ValueError: ``num_items <= 0`` or mixed with micro-batches without it.
            RuntimeError: called twice without ``opt.step()`` in between, or with stale
                gradients from an earlier ``loss.backward()`` still in place.
        """
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"opt.backward() takes the loss tensor (a scalar with a grad_fn), got "
                f"{type(loss).__name__}"
            )
        self._check_usable("backward()")
        if self._hook_weight is not None:
            raise RuntimeError("opt.backward() was called twice without opt.step() in between")
        self._check_scaler_used()
        weight = self._weight(num_items)
        self._warn_if_divided(loss)
        if self._dist is not None:
            self._dist.before_backward()
        stale = [self._names[id(p)] for p in self._params if p.grad is not None]
        if stale:
            raise RuntimeError(
                f"{len(stale)} parameter(s) already hold a gradient (first: {stale[0]}); call "
                "opt.step() or opt.zero_grad() before opt.backward()"
            )
        if not self._hooks:
            hook = _FoldHook(self)
            self._hooks = [
                p.register_post_accumulate_grad_hook(hook) for p in self._params if p.requires_grad
            ]
            weakref.finalize(self, _remove_handles, list(self._hooks))
        self._hook_weight, self._hook_uses = weight, num_items is not None
        if self._dist is not None and self._dist.weights_in_loss and weight != 1.0:
            # FSDP2 reduces during backward: the micro-batch weight has to be in the
            # gradient already, so backward starts from d(weight * loss) instead.
            seed = kwargs.pop("gradient", None)
            seed = torch.ones_like(loss) if seed is None else seed
            kwargs["gradient"] = seed * weight
        self._hooks_active = True
        control = self._wgrad_control
        if control is not None:
            control[0] = weight  # the fused layers' GEMM alpha; 0 turns them back to nn.Linear
        try:
            loss.backward(**kwargs)
            self._fold_pending()
            if self._dist is not None:
                self._dist.after_backward()
        except BaseException as err:
            self._pending = []
            self._pending_bytes = 0
            self._hook_weight = None
            if self._folded_in_this_micro_step():
                self._discard_window(err)
            raise
        finally:
            self._hooks_active = False
            if control is not None:
                control[0] = 0.0

    def _folded_in_this_micro_step(self) -> bool:
        """Whether any of the current micro-batch's gradients reached an accumulator."""
        control = self._wgrad_control
        return bool(
            self._covers
            or self._fused_this_step
            or (control is not None and control[1].item() != 0.0)
        )

    def _discard_window(self, err: BaseException) -> None:
        """A backward that failed after folding part of its micro-batch left a window that
        no longer stands for whole micro-batches: zero it, so that nothing partial steps."""
        earlier = self._micro_step
        self._drop_window()
        warnings.warn(
            f"fastaccum: opt.backward failed ({type(err).__name__}) after part of this "
            "micro-batch's gradients had been added to the accumulators; the window was "
            f"discarded with its {earlier} earlier micro-batch(es), so that no partial "
            "micro-batch is stepped. Parameters and optimizer state are unchanged",
            RuntimeWarning,
            stacklevel=_user_stacklevel(),
        )

    def _warn_if_divided(self, loss: torch.Tensor) -> None:
        if self._warned_divided or self._accum_steps == 1:
            return
        from fastaccum.distributed import loss_divided_by

        if loss_divided_by(loss, self._accum_steps):
            self._warned_divided = True
            warnings.warn(
                f"fastaccum: the loss passed to opt.backward() looks divided by accum_steps="
                f"{self._accum_steps}; the wrapper already averages over the window (over "
                "num_items, or over micro-batches without it), so the gradient ends up "
                f"{self._accum_steps}x too small. Pass the micro-batch's mean loss",
                UserWarning,
                stacklevel=_user_stacklevel(),
            )

    def _fold_hook(self, p: torch.Tensor) -> None:
        # Gradients are taken off the parameter as autograd finishes them and folded in
        # buckets of about bucket_bytes(device), so at most one bucket of gradients is
        # alive next to the accumulators, at a few fused calls per backward rather than one
        # per tensor.
        if not self._hooks_active or p.grad is None:
            return
        grad = p.grad
        p.grad = None
        self._pending.append((p, grad))
        self._pending_bytes += grad.numel() * grad.element_size()
        if self._pending_bytes >= self._bucket_limit:
            self._fold_pending()

    def _fold_pending(self) -> None:
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if pending:
            # (pending fills only while opt.backward's hooks run, with _hook_weight set)
            self._fold(pending, self._fold_weight(cast(float, self._hook_weight)))

    # ------------------------------------------------------------------ fused wgrad

    def _attach_wgrad_sinks(self, model: torch.nn.Module | None) -> None:
        """Make this wrapper the weight-gradient sink of the model's fused layers
        (fastaccum.nn.Linear, fastaccum.nn.Embedding, the fused Hugging Face Conv1D) whose
        parameters it updates."""
        if model is None:
            return
        from fastaccum.nn._sink import SinkLink, prepare_for_compile, register_sink

        register_sink(model, self)  # so that fuse_wgrad(model) later reaches this wrapper

        slots: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        for module in model.modules():
            if not isinstance(module, SinkLink):
                continue
            weight, bias = module._wgrad_pair()
            if id(weight) in self._param_ids:
                module._wgrad_sink = self
                module._wgrad_slot = len(slots)  # type: ignore[assignment]
                slots.append((weight, bias))
        if slots:
            prepare_for_compile()
            # [micro-batch weight while opt.backward runs, else 0; layers that wrote their
            # accumulators since the last step(); the same per layer]
            self._wgrad_control = torch.zeros(2 + len(slots), dtype=torch.float64)
            self._wgrad_layers = slots

    def _refresh_wgrad_sinks(self) -> None:
        """Attach the model's fused layers that are not attached yet (``fuse_wgrad`` run on
        the model after wrapping, parameter groups added later): now, between windows, or
        at the next window's start, so that no window mixes its layers' routes."""
        if self.model is None:
            return
        between_windows = self._micro_step == 0 and self._hook_weight is None
        if between_windows and not self._folded_in_this_micro_step():
            self._attach_wgrad_sinks(self.model)
            return
        self._sinks_stale = True

    def wgrad_route(
        self, layer: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int] | None:
        """The accumulators, control tensor and slot with which a fastaccum.nn.Linear
        (``fastaccum::linear_wgrad``) or fastaccum.nn.Embedding
        (``fastaccum::embedding_wgrad``) layer writes its gradients into this wrapper, or
        None when its weight (or trainable bias) is not accumulated here in fp32 (then the
        layer takes the Python route, which decides in backward)."""
        slot = getattr(layer, "_wgrad_slot", None)
        weight, bias = layer._wgrad_pair()
        ids = self._param_ids
        if (
            slot is None
            or not _backend.has_extension()  # a pure-Python install has no C++ route
            or self.accum_dtype != torch.float32
            or weight.dtype not in GRAD_DTYPES  # float64 accumulators: the unfused route
            or not weight.is_contiguous()  # its accumulator has the weight's strides
            or self._wgrad_layers[slot][0] is not weight  # e.g. FSDP2's unsharded copy
        ):
            return None
        bias_acc = None
        if bias is not None and bias.requires_grad:
            if id(bias) not in ids:
                return None
            bias_acc = self._accum_for(bias)
        control = cast(torch.Tensor, self._wgrad_control)  # made with the slots
        return self._accum_for(weight), bias_acc, control, slot

    def _collect_wgrad_hits(self) -> None:
        """Mark the parameters of the layers whose C++ route (fastaccum::linear_wgrad /
        embedding_wgrad) wrote their accumulators since the last step() as touched (one
        read of the control tensor)."""
        control = self._wgrad_control
        if control is None:
            return
        counts = control.tolist()
        if counts[1] == 0.0:
            return
        for (weight, bias), hits in zip(self._wgrad_layers, counts[2:], strict=True):
            if hits:
                self._mark_fused(weight, bias)
        control[1:] = 0.0

    def accepts_wgrad(self, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """True while ``opt.backward`` runs (the micro-batch weight is then known) for a
        weight (and trainable bias) this wrapper accumulates in fp32. ``loss.backward()``
        keeps the unfused path: its weight is known only at ``step(num_items=...)``.
        Under FSDP2 the layer sees the unsharded parameters: see
        :meth:`fastaccum.distributed.FSDPWindow.accepts_wgrad`."""
        if self._dist is not None and self._dist.sharded:
            return self._hooks_active and self._dist.accepts_wgrad(weight, bias)
        ids = self._param_ids
        return (
            self._hooks_active
            and self.accum_dtype == torch.float32
            and weight.dtype in GRAD_DTYPES
            and weight.is_contiguous()
            and id(weight) in ids
            and (bias is None or not bias.requires_grad or id(bias) in ids)
        )

    def accumulate_wgrad(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        grad_out: torch.Tensor,
        input: torch.Tensor,
        transposed: bool = False,
        rows: slice | None = None,
    ) -> None:
        """Add ``weight x grad_out^T @ input`` into the weight's accumulator with one GEMM
        (and ``grad_out.sum(0)`` into the bias's), no dW tensor in between. A
        ``transposed`` weight (stored [in, out], Hugging Face's Conv1D) takes
        ``input^T @ grad_out``. With ``rows`` (one part of a packed weight, such as
        attention's q, k, v projection), only those rows of the accumulators."""
        target, alpha = self._wgrad_target()
        bias_acc = None
        if bias is not None and bias.requires_grad:
            bias_acc = target(bias)
        # The layer hands over [tokens, features] views of matching dtype, device and
        # shape, and the accumulators are fp32 (accepts_wgrad): the checks hold already.
        acc = target(weight)
        if rows is not None:  # rows of a contiguous accumulator: contiguous views
            acc = acc[rows]
            bias_acc = None if bias_acc is None else bias_acc[rows]
        if transposed:  # the same GEMM with its operands swapped, into the [in, out] accum
            wgrad_accumulate_unchecked(acc, input, grad_out, alpha)
            if bias_acc is not None:
                with torch.no_grad():
                    bias_acc.add_(grad_out.sum(0, dtype=torch.float32), alpha=alpha)
        else:
            wgrad_accumulate_unchecked(acc, grad_out, input, alpha, bias_acc)
        if self._dist is None or not self._dist.sharded:
            self._mark_fused(weight, bias)

    def _wgrad_target(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
        """Where a fused layer adds a parameter's gradient, and its alpha: the parameter's
        accumulator with the micro-batch weight, or under FSDP2 the window gradient FSDP2
        keeps unsharded, whose loss already carries that weight."""
        if self._dist is not None and self._dist.sharded:
            return self._dist.window_grad, 1.0
        return self._accum_for, cast(float, self._hook_weight)  # set while backward runs

    def accumulate_embedding_grad(
        self, weight: torch.Tensor, indices: torch.Tensor, grad_out: torch.Tensor
    ) -> None:
        """Add ``weight x grad_out[i]`` into row ``indices[i]`` of the embedding weight's
        accumulator (``index_add_``): only the looked-up rows are touched, no dense dW."""
        target, alpha = self._wgrad_target()
        acc = target(weight)
        rows = grad_out if grad_out.dtype == acc.dtype else grad_out.to(acc.dtype)
        with torch.no_grad():
            acc.index_add_(0, indices, rows, alpha=alpha)
        if self._dist is None or not self._dist.sharded:
            self._mark_fused(weight)

    def _mark_fused(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """A fused layer wrote the accumulators of ``weight`` (and of ``bias`` when it is
        trained) on this micro-step: no gradient of them for accumulate_ to measure, so the
        window norm reads them at the boundary."""
        ids = {id(weight)}
        if bias is not None and bias.requires_grad:
            ids.add(id(bias))
        self._touched |= ids
        self._fused_ids |= ids
        self._fused_seen |= ids
        self._fused_this_step = True

    def _wgrad_param_ids(self) -> set[int]:
        """:meth:`_fused_set` plus the parameters of every layer on the C++ fused-wgrad
        route, whose writes are collected only at ``step()``: during a backward, the
        parameters whose accumulators the noise scale measures as fused."""
        ids = self._fused_set()
        for weight, bias in self._wgrad_layers:
            ids.add(id(weight))
            if bias is not None:
                ids.add(id(bias))
        return ids

    def _fused_set(self) -> set[int]:
        """ids of this window's parameters that the noise scale measures through their
        accumulators: those fused layers wrote, and those they wrote in earlier windows
        (whose ordinary gradients are kept out of the per-micro-batch norms)."""
        return self._fused_ids | (self._fused_seen & self._touched)

    # ------------------------------------------------------------------ boundary

    def _bind_ddp(self, ddp: torch.nn.Module) -> None:
        """Drive ``ddp``, a ``DistributedDataParallel`` made around this wrapper's local
        model after the wrapper was built (the Hugging Face Trainer builds the optimizer
        first and lets accelerate wrap the model in DDP later, and makes a new DDP when it
        retries with a smaller batch), as if it had been passed as ``model=``. A no-op
        when the wrapper already drives ``ddp``; a DDP it drove before is left syncing
        every backward, as DDP does alone.

        Raises:
            TypeError: ``ddp`` is not a DistributedDataParallel, or a parameter's dtype
                cannot be reduced (float64, complex).
            ValueError: ``ddp`` wraps another module than ``model=``, or lacks a
                parameter of the optimizer.
            RuntimeError: a window is in progress, the wrapper drives an FSDP2 model, or
                DDP already has a communication hook.
            Nothing changes when it raises.
        """
        ddp_type = torch.nn.parallel.DistributedDataParallel
        if self._dist is not None and self._dist.model is ddp:
            return
        if not isinstance(ddp, ddp_type):
            raise TypeError(f"expected a DistributedDataParallel, got {type(ddp).__name__}")
        if self._dist is not None and not isinstance(self._dist.model, ddp_type):
            raise RuntimeError("this wrapper drives an FSDP2 model, not a DDP one")
        local = self.model.module if isinstance(self.model, ddp_type) else self.model
        if local is not None and ddp.module is not local:
            raise ValueError("the DistributedDataParallel wraps another module than model=")
        if self._micro_step or self._pending or self._folded_in_this_micro_step():
            raise RuntimeError(
                "a DDP model can only be taken over between windows; this one holds "
                f"{self._micro_step} micro-batch(es)"
            )
        from fastaccum.distributed import attach

        names = self._param_names(self._params, ddp)
        before = self._names, self._dist
        self._names, self._dist = names, None  # attach() builds a window of its own
        try:
            window = attach(self, ddp, False)
        except BaseException:
            self._names, self._dist = before
            raise
        self._dist = window
        self.model = ddp
        self._sync_next()

    def flush(self) -> bool:
        """Step on a partial window (end of an epoch), normalized by what it actually held.

        Returns True when the wrapped optimizer stepped; False for an empty window or one
        skipped for non-finite gradients. Under DDP call it on every rank: a rank whose
        partial window is empty joins the boundary of the others (with no items), and all
        return False only when every rank's window is empty.
        """
        self._check_usable("flush()")
        if self._dist is None:
            return self._micro_step > 0 and self._finish_window()
        if not self._dist.any_rank_holds(self._micro_step):
            return False
        self._dist.check_flush()
        return self._finish_window()

    def _replaced_params_hint(self) -> str:
        """For a message about missing gradients: a note when ``model`` no longer holds the
        parameters this wrapper updates (``load_state_dict(..., assign=True)``, a module
        swapped after wrapping), else ''."""
        if self.model is None:
            return ""
        current = {id(p) for p in self.model.parameters()}
        gone = [self._names[id(p)] for p in self._params if id(p) not in current]
        if not gone:
            return ""
        return (
            f". The model no longer holds {len(gone)} of the parameters this optimizer "
            f"updates (first: {gone[0]}), as after load_state_dict(..., assign=True) or a "
            "module replaced after wrapping: build the optimizer and the wrapper on the "
            "model's new parameters"
        )

    def _check_usable(self, call: str, *, micro_batch: bool = True) -> None:
        """Raise RuntimeError when this fused optimizer joined a list's wrapper, or (for
        a ``call`` that takes a ``micro_batch``) ValueError when it has sharded parameters
        and no model to reduce them."""
        if micro_batch and not self._joined and self._unusable is not None:
            raise ValueError(self._unusable)
        if self._joined:
            raise RuntimeError(
                f"{call} on a {type(self).__name__} that joined fastaccum.wrap([...]): that "
                "wrapper holds the window and steps it; call its methods instead"
            )
        if micro_batch and len(self.param_groups) != self._group_count:
            self._adopt_new_groups()

    def _micro_sumsq(self, device: torch.device) -> torch.Tensor:
        """float64 [micro-steps so far]: each micro-batch's gradient sum of squares (0 for
        one whose gradients all went through fused-wgrad layers), in one reduction."""
        sums = torch.zeros(self._micro_step, dtype=torch.float64, device=device)
        if self._sumsq_parts:
            parts = torch.stack(
                [t.to(device=device, dtype=torch.float64) for t in self._sumsq_parts]
            )
            owner = torch.tensor(self._sumsq_micro, device=device)
            sums.index_add_(0, owner, parts)
        return sums

    def _note_fused_first(self, weight: float) -> None:
        """Keep the squared norm of the first micro-batch's gradient of the fused-wgrad
        layers, which their accumulators now hold exactly ``weight`` times (one read of
        those accumulators per window, no sync): the per-micro-batch norm the noise scale
        needs, which the fused GEMM never measures."""
        fused = self._fused_set()
        accs = [_memory_order(a) for p, a in self._accums.items() if id(p) in fused]
        if accs and weight > 0.0:
            self._fused_first = sumsq_unchecked(accs).double() / (weight * weight)

    def _window_norm_sq(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Squared norm of the summed, weighted (still loss-scaled) window gradient, and
        the part of it in the accumulators of fused-wgrad layers (None without any).

        The last micro-step's accumulate_ calls already returned it for the tensors they
        touched; only accumulators that micro-step left alone are read again.
        """
        covered: set[int] = set()
        parts = []
        for ids, accum_sumsq in self._covers:
            if accum_sumsq is not None:  # None: float64 folds, which do not measure it
                covered |= ids
                parts.append(accum_sumsq)
        fused_ids = self._fused_set()
        rest: dict[tuple[torch.device, bool, bool], list[torch.Tensor]] = {}
        # fused accumulators that the last micro-step's accumulate_ also folded into (a tied
        # weight): their squares are inside its total, so they are read once more alone
        fused_covered: dict[torch.device, list[torch.Tensor]] = {}
        for p, acc in self.window_accums().items():
            if id(p) not in covered:
                key = (acc.device, acc.dtype == torch.float64, id(p) in fused_ids)
                rest.setdefault(key, []).append(acc)
            elif id(p) in fused_ids:
                fused_covered.setdefault(acc.device, []).append(_memory_order(acc))
        fused = [sumsq_unchecked(accs) for accs in fused_covered.values()]
        for (_, wide, is_fused), accs in rest.items():  # one read each
            if wide:
                parts.append(sumsq_wide(accs))
            else:
                parts.append(sumsq_unchecked([_memory_order(a) for a in accs]))
            if is_fused:
                fused.append(parts[-1])
        device = parts[0].device

        def total(ts: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([t.to(device=device, dtype=torch.float64) for t in ts]).sum()

        return total(parts), total(fused) if fused else None

    def _finish_window(self) -> bool:
        inv_scale = 1.0
        if self.scaler is not None and self.scaler.is_enabled():
            inv_scale = 1.0 / self.scaler.get_scale()
        # Under DDP the accumulators are about to be replaced by their reduced sum, whose
        # norm the reduction measures; the local one is needed only when they stay local.
        local_norm = self._touched and (self._dist is None or self._dist.sharded)
        norm_sq, fused_sq = self._window_norm_sq() if local_norm else (None, None)
        device = self._params[0].device if norm_sq is None else norm_sq.device
        if self._window_bad:
            bad = torch.stack([b.to(device) for b in self._window_bad]).any()
        else:  # only fused-wgrad layers: the norm's finiteness is the check
            bad = torch.zeros((), dtype=torch.bool, device=device)
        micro = self._micro_sumsq(device)
        # (window, first micro-batch) squared gradient norms of the fused-wgrad layers
        self._last_fused = None
        self._pooled = None
        if self._dist is None:
            # One host sync per window: the skip decision and the statistics.
            if norm_sq is None:  # nothing was folded (only fused-wgrad layers, if any)
                norm_sq = torch.zeros((), dtype=torch.float64, device=device)
            fused = self._fused_norms(fused_sq)
            host = torch.cat(
                [norm_sq.reshape(1), bad.double().reshape(1), fused.to(device), micro]
            ).tolist()
            total, norm_sq_host, bad_host = math.fsum(self._weights), host[0], host[1] != 0.0
            if fused.numel():
                fused_window, fused_first = host[2:4]
                self._last_fused = (
                    fused_window * (inv_scale / total) ** 2,
                    fused_first * inv_scale * inv_scale,
                )
            micro_host = host[2 + fused.numel() :]
        else:
            # Reduction, then one exchange of counts and the same single host sync.
            if norm_sq is None:
                norm_sq = torch.zeros((), dtype=torch.float64, device=device)
            from fastaccum.distributed import RanksDisagreeError

            try:
                total, norm_sq_host, bad_host, micro_host, fused_host = self._dist.finish_window(
                    norm_sq, bad, micro, self._usable_fused_first()
                )
            except RanksDisagreeError:
                self._drop_window()  # on every rank: all of them raise here
                raise
            if fused_host is not None:  # the reduced window's fused part, this rank's first
                fused_window, fused_first = fused_host
                window_scale = inv_scale * self._dist.grad_factor / total
                self._last_fused = (
                    fused_window * window_scale * window_scale,
                    fused_first * inv_scale * inv_scale,
                )
            pooled = self._dist.pooled  # sums over every rank: norms unscaled as above
            if pooled is not None:
                sq = inv_scale * inv_scale
                self._pooled = [v * sq if at in (1, 4) else v for at, v in enumerate(pooled)]
        self._last_micro_sumsq = [s * inv_scale * inv_scale for s in micro_host]
        if self._dist is not None:
            inv_scale *= self._dist.grad_factor  # FSDP2's average over ranks, undone
        norm = (
            math.sqrt(norm_sq_host) * inv_scale / total if math.isfinite(norm_sq_host) else math.inf
        )
        found_bad = bad_host or not math.isfinite(norm)
        stepped = False
        if found_bad:
            self._skip_window()
        else:
            clip = 1.0
            if self.max_grad_norm is not None:
                clip = min(1.0, self.max_grad_norm / (norm + _CLIP_EPS))
            try:
                if self._masters:
                    self._follow_changed_params()
                self._window_fused = self._fusable_window()
                self._torch_stepped = False
                self._run_step_hooks(pre=True)
                self._apply_and_step(inv_scale / total * clip)
            except BaseException as err:
                self._drop_failed_window(err)
                raise
            self._last_update_fused = not self._torch_stepped
            self._last_norm = norm
            self._windows += 1
            self._items_seen += total
            stepped = True
        self._update_scaler(found_bad)
        if self.model is not None:
            end_window(self.model, discard=found_bad)
        if not found_bad:
            self._track_noise_scale(norm, total)
        self._reset_window()
        self._sync_next()
        if stepped:  # the wrapper is in its post-step state: parameters, statistics, window
            self._run_step_hooks(pre=False)
        return stepped

    def _run_step_hooks(self, pre: bool) -> None:
        """Run the step pre (or post) hooks registered on this wrapper, plus torch's global
        ones when no wrapped ``torch.optim`` step runs those, with ``(self, (), {})``.

        Raises:
            RuntimeError: a pre hook returned a value: step()'s arguments were used when
                the micro-batch was folded, so they cannot be replaced here.
        """
        own = self._optimizer_step_pre_hooks if pre else self._optimizer_step_post_hooks
        name = "_global_optimizer_pre_hooks" if pre else "_global_optimizer_post_hooks"
        torch_steps = self._steps_wrapped_optimizer and not self._window_fused
        shared = {} if torch_steps else getattr(torch_optimizer, name, {})
        hooks = (
            chain(shared.values(), own.values()) if pre else chain(own.values(), shared.values())
        )
        for hook in hooks:
            if hook(self, (), {}) is not None and pre:
                raise RuntimeError(
                    f"step pre hook {hook!r} returned a value: on a fastaccum wrapper the hooks "
                    "run at the window boundary, after step()'s arguments were used, so they "
                    "must return None"
                )

    def _drop_window(self) -> None:
        """Throw the window away: accumulators zeroed, AccumBatchNorm window statistics
        discarded, micro-step 0, gradient sync set for the next micro-batch."""
        if self._accums:
            torch._foreach_zero_(list(self._accums.values()))
        if self.model is not None:
            end_window(self.model, discard=True)
        self._reset_window()
        self._sync_next()

    def _drop_failed_window(self, err: BaseException) -> None:
        """A step pre hook or the wrapped optimizer's step raised: the accumulators then hold
        the window, maybe scaled and partly consumed. Discard it and clear the .grad it was
        handed, so that the next micro-batch starts a clean window instead of stepping this
        one again."""
        for target in [*self._params, *self._masters.values()]:
            target.grad = None
        self._drop_window()
        add_note(
            err,
            "fastaccum: the window's update failed (a step pre hook or the wrapped "
            "optimizer's step raised), so this window's accumulated gradients were discarded "
            "(micro_step is 0 again); whatever the optimizer had already updated before it "
            "raised stays updated",
        )

    def _fused_norms(self, fused_sq: torch.Tensor | None) -> torch.Tensor:
        """float64 [window, first micro-batch] squared norms of the fused-wgrad layers'
        gradients (weighted, loss-scaled window sum; first micro-batch's mean-loss
        gradient) when this window can estimate the noise scale with them, else empty.

        Not when a fused parameter's ordinary gradient went into the per-micro-batch norms
        (a tied weight, in the first window its fused layer writes: it would be counted
        twice), nor without the first micro-batch's norm (a window of one micro-batch, or
        one resumed from a checkpoint that predates it)."""
        first = self._usable_fused_first()
        if fused_sq is None or first is None:
            return torch.zeros(0, dtype=torch.float64)
        return torch.stack([fused_sq, first.to(fused_sq.device)])

    def _usable_fused_first(self) -> torch.Tensor | None:
        """The first micro-batch's squared norm of the fused set, unless a fused
        parameter's ordinary gradient also went into the per-micro-batch norms."""
        first = self._fused_first
        return None if first is None or self._fused_set() & self._measured_ids else first

    def _track_noise_scale(self, norm: float, total: float) -> None:
        """Fold the window into the noise-scale estimate, from numbers the window's one host
        sync already brought back (no extra sync).

        The unfused parameters give one squared norm per micro-batch. Fused-wgrad layers
        write no gradient to measure, so for them the first micro-batch's norm stands for
        all: their |G|^2 and tr(Sigma) are estimated apart (both estimates are unbiased;
        theirs is noisier) and the two sets are added. Under DDP and FSDP2 the
        micro-batches are every rank's (their norms and sizes summed over the ranks in the
        window's one exchange) and the window is every rank's, so that all ranks hold the
        same estimate. Under FSDP2 every parameter counts as fused, each rank's first
        micro-batch's norm read from FSDP2's unsharded gradient; when FSDP2 reduces every
        micro-batch, the micro-batches are the global ones instead.
        Windows that cannot separate two batch sizes (one micro-batch on one process),
        and windows without the first micro-batch's norm that :meth:`_fused_norms` needs
        (one micro-batch per rank under DDP/FSDP2) are left out."""
        micro, sizes = self._last_micro_sumsq, self._weights
        units = "items" if self._uses_num_items else "micro-batches"
        tracker = self.noise_scale_tracker
        if self._dist is not None and self._dist.every_micro_step:
            # FSDP2 reducing every micro-batch: the global micro-batches and the window
            with contextlib.suppress(ValueError):
                tracker.update(micro, norm * norm, self._dist.micro_sizes, total, units)
                self._last_window_size = total
            return
        if self._dist is not None:
            # Every rank's micro-batches against the window of every rank: the sums of
            # their norms and sizes come added over the ranks, so that every rank holds the
            # same estimate. FSDP2: every parameter counts as a fused layer's.
            if self._pooled is None:
                return
            n, sq, inv, n_first, sq_first, inv_first = self._pooled
            with contextlib.suppress(ValueError):
                if self._dist.sharded or self._fused_set():
                    if self._last_fused is None:
                        return
                    fused_window = self._last_fused[0]
                    terms = pooled_terms(n_first, sq_first, inv_first, fused_window, total)
                    if not self._dist.sharded:  # the unfused parameters on top
                        rest = pooled_terms(n, sq, inv, norm * norm - fused_window, total)
                        terms = (terms[0] + rest[0], terms[1] + rest[1])
                else:
                    terms = pooled_terms(n, sq, inv, norm * norm, total)
                tracker.update_terms(*terms, units)
                self._last_window_size = total
            return
        if not micro or len(micro) != len(sizes):
            return
        with contextlib.suppress(ValueError):
            if not self._fused_set():
                tracker.update(micro, norm * norm, sizes, total, units)
            elif self._last_fused is not None:
                fused_window, fused_first = self._last_fused
                grad_sq, trace = noise_scale_terms(micro, norm * norm - fused_window, sizes)
                fused_grad_sq, fused_trace = noise_scale_terms(
                    [fused_first], fused_window, sizes[:1], window_size=total
                )
                tracker.update_terms(grad_sq + fused_grad_sq, trace + fused_trace, units)
            else:
                return
            self._last_window_size = total

    def _skip_window(self) -> None:
        self._skipped_windows += 1
        if self.scaler is None or not self.scaler.is_enabled():
            offenders = [
                self._names[id(p)]
                for p, acc in self._accums.items()
                if not bool(torch.isfinite(acc).all())
            ]
            shown = ", ".join(offenders[:5]) + (" ..." if len(offenders) > 5 else "")
            warnings.warn(
                f"fastaccum: non-finite gradients in {len(offenders)} parameter(s) ({shown}); "
                "the window was skipped and parameters and optimizer state are unchanged",
                RuntimeWarning,
                stacklevel=_user_stacklevel(),
            )
        if self._accums:
            torch._foreach_zero_(list(self._accums.values()))

    def _fused_window_update(self, window: ParamMap, factor: float, accums: ParamMap) -> None:
        """The fused classes' update of ``window`` (see fastaccum.optim.fused); only
        classes with ``_fused_update`` have one."""
        raise NotImplementedError(f"{type(self).__name__} has no fused update")

    def _fusable_window(self) -> bool:
        """Whether this boundary's update runs the fused kernel in place of the wrapped
        ``torch.optim`` SGD/Adam/AdamW's ``step()`` (see ``fused_update`` in :func:`wrap`)."""
        if self._auto_step is None:
            return False
        from fastaccum.optim.fused import auto_fusable

        return auto_fusable(self, self.window_accums(), self.optimizer, self._auto_step)

    def _fuse_list_members(self, window: ParamMap, factor: float) -> None:
        """The fused update for each ``torch.optim`` SGD/Adam/AdamW member of a list whose
        part of ``window`` it applies to (see ``fused_update`` in :func:`wrap`); their
        parameters leave ``window``. The list's ``step()`` still calls their ``step()``,
        which finds no gradient for them (and runs torch's global hooks, as before)."""
        from fastaccum.optim.fused import auto_fusable, fused_window_update

        owner = {
            id(t): member
            for member, _ in self._auto_members
            for g in member.param_groups
            for t in g["params"]
        }
        parts: dict[int, dict[torch.Tensor, torch.Tensor]] = {}
        for p, acc in window.items():
            member = owner.get(id(self._masters.get(p, p)))
            if member is not None:
                parts.setdefault(id(member), {})[p] = acc
        for member, update in self._auto_members:
            part = parts.get(id(member))
            if part and auto_fusable(self, part, member, update):
                fused_window_update(self, update, part, factor, self._accums, member)
                for p in part:
                    del window[p]

    def _apply_and_step(self, factor: float) -> None:
        """Write factor x accumulator into each updated tensor's .grad, step, reset; or,
        where :meth:`_fusable_window` said so, run the fused update instead.

        The extension point for subclasses (the fused optimizers replace it): it must
        apply ``factor x accumulator`` as the gradient of every parameter in
        :meth:`window_accums` and leave those accumulators zeroed.
        """
        window = self.window_accums()
        if self._window_fused and self._auto_step is not None:
            from fastaccum.optim.fused import fused_window_update

            fused_window_update(self, self._auto_step, window, factor, self._accums)
            # An LR scheduler built on the wrapped optimizer checks that its step ran.
            self.optimizer._opt_called = True  # type: ignore[attr-defined]
            return
        if self._auto_members:
            self._fuse_list_members(window, factor)
        for member in self._fused_members:  # fused classes joined in a list: their kernels
            mine = {p: window.pop(p) for p in member._params if p in window}
            if mine:
                member._fused_window_update(mine, factor, self._accums)
            # An LR scheduler built on the member checks that its step ran before its own.
            member._opt_called = True  # type: ignore[attr-defined]
        self._torch_stepped = bool(window)
        aliased, written = [], []
        for p, acc in window.items():
            target = self._masters.get(p, p)
            if acc.dtype == target.dtype.to_real():
                aliased.append((target, acc))
            else:
                written.append((target, acc))
        groups: dict[tuple[torch.device, bool], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for target, acc in aliased:
            groups.setdefault((acc.device, True), []).append((target, acc))
        for target, acc in written:
            groups.setdefault((acc.device, False), []).append((target, acc))
        # Sharded (FSDP2) parameters take their local shard wrapped back into a DTensor.
        as_grad = (lambda target, t: t) if self._dist is None else self._dist.as_grad
        for (_, alias), group in groups.items():
            accums = [acc for _, acc in group]
            if alias:
                # Scale in place and hand the accumulator itself to the optimizer as .grad:
                # no second full-size gradient buffer at step time.
                wide = [a for a in accums if a.dtype == torch.float64]
                narrow = [_memory_order(a) for a in accums if a.dtype != torch.float64]
                if wide:  # the kernels do not take float64: one foreach pass instead
                    torch._foreach_mul_(wide, factor)
                if narrow:
                    finalize_(narrow, None, factor, zero_accums=False)
                for target, acc in group:
                    grad = torch.view_as_complex(acc) if target.is_complex() else acc
                    target.grad = as_grad(target, grad)
            else:
                # In the accumulator's memory format, whatever the parameter's is now.
                outs = [torch.empty_like(acc, dtype=target.dtype) for target, acc in group]
                finalize_(
                    [_memory_order(a) for a in accums],
                    [_memory_order(o) for o in outs],
                    factor,
                    zero_accums=True,
                )
                for (target, _), out in zip(group, outs, strict=True):
                    target.grad = as_grad(target, out)
        self.optimizer.step()
        self._refresh_from_masters(self._masters)
        if aliased:  # one multi-tensor launch rather than one per parameter
            torch._foreach_zero_([acc for _, acc in aliased])
        for target, _ in (*aliased, *written):
            target.grad = None

    def _refresh_from_masters(self, params: Iterable[torch.Tensor]) -> None:
        """Copy the updated fp32 masters of ``params`` (those that have one) into them."""
        pairs = [(p, self._masters[p]) for p in params if p in self._masters]
        if pairs:
            with torch.no_grad():
                torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])
            for p, _ in pairs:
                self._master_versions[p] = p._version

    def _follow_changed_params(self) -> None:
        """Copy into its master each parameter changed in place since its master was last
        in step with it (``model.load_state_dict(...)``, or ``p.copy_(...)`` under
        ``torch.no_grad()``, after wrapping): the update then starts from the parameter's
        value, as a ``torch.optim`` step would. One version-counter read per parameter.

        A parameter written with its master's own rounding (a checkpoint's model weights
        loaded after the wrapper's state dict, which restored the fp32 masters) keeps its
        master: the write carried nothing the master lacks."""
        versions = self._master_versions
        changed = []
        for p in self._masters:
            if p._version != versions[p]:
                if torch.equal(p, self._masters[p].to(p.dtype)):
                    versions[p] = p._version
                else:
                    changed.append(p)
        if changed:
            self.sync_masters(changed)

    def sync_masters(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Copy the model's bf16/fp16 parameters (``params``, default all) into their fp32
        masters (``master_weights=True``), discarding the masters' extra precision.

        In-place changes made after wrapping (``model.load_state_dict``, ``copy_`` under
        ``torch.no_grad()``) are followed by the next update without this call; changes
        through ``.data`` (``p.data.copy_(...)``) do not move the parameter's version
        counter and need it. Without masters it does nothing.
        """
        chosen = list(self._masters if params is None else params)
        pairs = [(self._masters[p], p) for p in chosen if p in self._masters]
        if pairs:
            with torch.no_grad():
                torch._foreach_copy_([m for m, _ in pairs], [p for _, p in pairs])
            for _, p in pairs:
                self._master_versions[p] = p._version

    def _update_scaler(self, found_inf: bool) -> None:
        """GradScaler's update rule, applied once per window rather than per micro-step."""
        if self.scaler is None or not self.scaler.is_enabled():
            return
        scale = self.scaler.get_scale()
        if found_inf:
            scale *= self.scaler.get_backoff_factor()
            self._windows_since_inf = 0
        else:
            self._windows_since_inf += 1
            if self._windows_since_inf >= self.scaler.get_growth_interval():
                scale *= self.scaler.get_growth_factor()
                self._windows_since_inf = 0
        self.scaler.update(scale)

    # ------------------------------------------------------------------ telemetry

    def stats(self) -> dict[str, Any]:
        """Accumulation telemetry.

        Returns a dict with ``grad_norm`` (global L2 norm of the last applied window's
        gradient, unscaled, before clipping; None before the first step),
        ``micro_batch_sumsq`` (squared L2 norms of each micro-batch's gradient in the last
        finished window, unscaled; under DDP this rank's micro-batches; under FSDP2 with
        ``reduce_scatter_every_micro_step`` the global micro-batches (the k-th of every
        rank), else empty: FSDP2 hands over only the reduced window), ``skipped_windows``,
        ``windows`` (applied),
        ``items_seen`` (sum of num_items, or of micro-batches, over applied windows, over
        all ranks under a distributed model),
        ``micro_step`` and ``accum_steps``, ``fused_update`` (whether the last applied
        window's update ran fastaccum's fused kernel rather than a ``torch.optim``
        ``step()``; None before the first), and the gradient noise scale (McCandlish et al.
        2018, see :mod:`fastaccum.stats`): ``noise_scale`` (B_simple = tr(Sigma) / |G|^2,
        smoothed over windows; None until it can be estimated), ``noise_scale_units``
        ("items" with num_items, else "micro-batches") and ``critical_batch_hint`` (the
        window size against the noise scale, in words). The noise scale is estimated from
        the same numbers as ``grad_norm`` and ``micro_batch_sumsq``, at no extra sync.
        Fused-wgrad layers never produce a gradient to measure per micro-batch: for them
        the first micro-batch's norm is read from their accumulators (one read per
        window), and their part of the estimate is noisier; under FSDP2 every parameter's
        is read so, from FSDP2's unsharded gradient. ``micro_batch_sumsq`` leaves
        out the parameters fused layers write (from its second window, also a tied
        weight's ordinary gradient).
        """
        tracker = self.noise_scale_tracker
        window = self._last_window_size
        return {
            "noise_scale": tracker.noise_scale,
            "noise_scale_units": tracker.units,
            "critical_batch_hint": None if window is None else tracker.hint(window),
            "grad_norm": self._last_norm,
            "micro_batch_sumsq": list(self._last_micro_sumsq),
            "skipped_windows": self._skipped_windows,
            "windows": self._windows,
            "items_seen": self._items_seen,
            "micro_step": self._micro_step,
            "accum_steps": self._accum_steps,
            "fused_update": self._last_update_fused,
        }

    # ------------------------------------------------------------------ checkpoints

    def _config(self) -> dict[str, Any]:
        """What a state dict must match (accum_steps is state: it may change in training)."""
        return {
            "accum_dtype": str(self.accum_dtype),
            "master_weights": self.master_weights,
            "param_shapes": [tuple(p.shape) for p in self._params],
        }

    def _indices_of(self, ids: set[int]) -> list[int]:
        """Positions in the parameter list of the parameters whose ids are in ``ids`` (how a
        state dict names them)."""
        return [i for i, p in enumerate(self._params) if id(p) in ids]

    def _ids_at(self, indices: Iterable[int]) -> set[int]:
        """The ids of the parameters at ``indices`` (the inverse of :meth:`_indices_of`)."""
        return {id(self._params[i]) for i in indices}

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus the accumulation state.

        ``"fastaccum"`` holds the configuration, the accumulators (None for parameters that
        have none yet, and all None at a window boundary, where they are zero), fp32
        masters, the micro-step, the window's item weights, the telemetry and, with
        ``model=``, the AccumBatchNorm window statistics, so a run saved mid-window resumes
        exactly. ``"optimizer"`` is the wrapped optimizer's state
        dict, whose entries (``"state"`` and ``"param_groups"``) are also at the top level:
        the wrapped optimizer loads the dict on its own, at a window boundary all the state
        there is (a window in progress is not part of it).

        Called by ``torch.distributed.checkpoint`` (``get_state_dict``), it returns the
        wrapped optimizer's own state dict, which holds all the state at a boundary.

        Raises:
            RuntimeError: between ``opt.backward()`` and ``opt.step()``; from
                torch.distributed.checkpoint, inside a window; under FSDP2's default mode,
                inside a window (its gradients are FSDP2's until the boundary).
        """
        if self._hook_weight is not None:
            raise RuntimeError(
                "state_dict() between opt.backward() and opt.step(); call step() first"
            )
        if self._masters:  # the masters saved are those the next update would start from
            self._follow_changed_params()
        if _called_by_distributed_checkpoint():
            # torch.distributed.checkpoint keeps only a torch.optim-format state dict: the
            # wrapped optimizer's, which is all the state there is at a window boundary.
            if self._micro_step:
                raise RuntimeError(
                    "torch.distributed.checkpoint saves the wrapped optimizer's state, not a "
                    f"window in progress ({self._micro_step} of {self._accum_steps} "
                    "micro-batches folded): save at a boundary (when opt.step() returned "
                    "True), or flush() first, or save opt.state_dict() with torch.save. "
                    "Nothing was changed"
                )
            return self.optimizer.state_dict()
        dist_window = self._dist
        if (
            self._micro_step
            and dist_window is not None
            and dist_window.sharded
            and not dist_window.every_micro_step
        ):
            raise RuntimeError(
                "state_dict() in the middle of an FSDP2 window "
                f"({self._micro_step} of {self._accum_steps} micro-batches folded): in "
                "FSDP2's default mode the window's gradients live in FSDP2's unsharded "
                "gradients until the boundary, and no state dict holds those. Save at a "
                "boundary (when opt.step() returned True), or wrap with "
                "reduce_scatter_every_micro_step=True to save mid-window. Nothing was changed"
            )
        window_bad = (
            torch.stack([b.cpu() for b in self._window_bad]).any() if self._window_bad else None
        )
        inner = self.optimizer.state_dict()
        return {
            # The wrapped optimizer's entries at the top level too (the same objects, saved
            # once), so that the optimizer loads this without the wrapper: a run can go back
            # to plain torch.optim (or Trainer) from a fastaccum checkpoint.
            **inner,
            "optimizer": inner,
            "fastaccum": {
                **self._config(),
                "accum_steps": self._accum_steps,
                # At a boundary every accumulator is zero: none are saved (a checkpoint
                # the size of the optimizer state, not one fp32 gradient set more).
                "accums": [self._accums.get(p) if self._micro_step else None for p in self._params],
                "masters": [self._masters.get(p) for p in self._params],
                "micro_step": self._micro_step,
                "touched": self._indices_of(self._touched),
                "fused": self._indices_of(self._fused_ids),
                "fused_seen": self._indices_of(self._fused_seen),
                "measured": self._indices_of(self._measured_ids),
                "fused_first": self._fused_first,
                "weights": list(self._weights),
                "uses_num_items": self._uses_num_items,
                "window_bad": window_bad,
                "micro_sumsq": list(self._micro_sumsq(torch.device("cpu")).unbind()),
                "skipped_windows": self._skipped_windows,
                "windows": self._windows,
                "items_seen": self._items_seen,
                "last_norm": self._last_norm,
                "last_micro_sumsq": list(self._last_micro_sumsq),
                "windows_since_inf": self._windows_since_inf,
                "noise_scale": self.noise_scale_tracker.state_dict(),
                "last_window_size": self._last_window_size,
                "batchnorm": None if self.model is None else window_state_dict(self.model),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, accumulation state included.

        A plain ``torch.optim`` state dict (a checkpoint saved before the optimizer was
        wrapped; for a list of optimizers, ``{"optimizers": [one per member]}``) is loaded
        into the wrapped optimizer, fp32 masters are refreshed from the parameters, and a
        new window starts.

        Raises:
            ValueError: the state dict is not a fastaccum one, or comes from another
                configuration (accum_dtype, master_weights, parameter shapes, accumulator
                dtypes or the model's AccumBatchNorm layers differ), or holds BatchNorm
                window statistics and this wrapper has no ``model=``. Nothing is changed
                then.

        Warns:
            RuntimeWarning: the saved ``accum_steps`` differs from this wrapper's (the saved
                one is restored: K is training state, like the micro-step), saved mid-window
                without BatchNorm window statistics while ``model`` has AccumBatchNorm
                layers (their window restarts empty), or a torch.optim state dict loaded
                mid-window (the window is discarded).
        """
        if _is_plain_optimizer_state(state_dict, self.optimizer):
            self._load_plain_state_dict(state_dict)
            return
        if not isinstance(state_dict, dict) or "fastaccum" not in state_dict:
            got = list(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            inner = "a torch.optim one ('state' and 'param_groups')"
            if isinstance(self.optimizer, ChainedOptimizer):
                inner += " or a list of them ('optimizers')"
            raise ValueError(
                f"not a fastaccum state dict (no 'fastaccum' entry) nor {inner}; got {got}"
            )
        saved = state_dict["fastaccum"]
        for key, here in self._config().items():
            there = saved.get(key)
            if key == "param_shapes" and there is not None:
                there = [tuple(s) for s in there]
            if there != here:
                raise ValueError(
                    f"state dict from another configuration: {key} is {there} there and {here} here"
                )
        for p, acc in zip(self._params, saved["accums"], strict=True):
            if acc is None:
                continue
            shape, dtype = self._accum_spec(p)
            if acc.shape != shape or acc.dtype != dtype:
                raise ValueError(
                    f"state dict from another configuration: the accumulator of "
                    f"{self._names[id(p)]} is {acc.dtype} {tuple(acc.shape)} there, but this "
                    f"wrapper accumulates it in {dtype} {tuple(shape)} (parameter dtype "
                    f"{p.dtype})"
                )
        accum_steps = saved.get("accum_steps", self._accum_steps)
        micro_step = saved.get("micro_step")
        if (
            isinstance(accum_steps, bool)
            or not isinstance(accum_steps, int)
            or not isinstance(micro_step, int)
            or not 0 <= micro_step < accum_steps
        ):
            raise ValueError(
                f"state dict is inconsistent: accum_steps {accum_steps!r} with micro_step "
                f"{micro_step!r} (expected ints with 0 <= micro_step < accum_steps)"
            )
        batchnorm = saved.get("batchnorm")  # absent from state dicts saved before it existed
        if batchnorm and self.model is None:
            raise ValueError(
                "the state dict holds AccumBatchNorm window statistics, but this wrapper has "
                "no model= to restore them into; wrap with model=model"
            )
        if batchnorm is not None and self.model is not None:
            check_window_states(self.model, batchnorm)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._accums = {}
        for p, acc in zip(self._params, saved["accums"], strict=True):
            if acc is not None:
                self._accums[p] = acc.detach().to(device=p.device, copy=True)
        with torch.no_grad():
            for p, master in zip(self._params, saved["masters"], strict=True):
                if master is not None and p in self._masters:
                    self._masters[p].copy_(master)
                    self._master_versions[p] = p._version
        if accum_steps != self._accum_steps:
            warnings.warn(
                f"fastaccum: accum_steps is now {accum_steps}, restored from the state dict "
                f"(this wrapper was set to {self._accum_steps}), so that the run continues "
                "as saved; set opt.accum_steps after loading to change it",
                RuntimeWarning,
                stacklevel=2,
            )
            self._accum_steps = accum_steps
        self._reset_window()
        self._micro_step = micro_step
        self._touched = self._ids_at(saved["touched"])
        # absent from state dicts saved before the fused-wgrad noise scale: that window
        # is then left out of it
        self._fused_ids = self._ids_at(saved.get("fused", ()))
        self._fused_seen = self._ids_at(saved.get("fused_seen", ()))
        self._measured_ids = self._ids_at(saved.get("measured", ()))
        if saved.get("fused_first") is not None:
            self._fused_first = saved["fused_first"].to(self._params[0].device)
        self._weights = list(saved["weights"])
        self._uses_num_items = saved["uses_num_items"]
        device = self._params[0].device
        if saved["window_bad"] is not None:
            self._window_bad = [saved["window_bad"].to(device)]
        self._sumsq_parts = [s.to(device) for s in saved["micro_sumsq"]]
        self._sumsq_micro = list(range(len(self._sumsq_parts)))
        self._skipped_windows = saved["skipped_windows"]
        self._windows = saved["windows"]
        self._items_seen = saved["items_seen"]
        self._last_norm = saved["last_norm"]
        self._last_micro_sumsq = list(saved["last_micro_sumsq"])
        self._windows_since_inf = saved["windows_since_inf"]
        if "noise_scale" in saved:  # absent from state dicts saved before it existed
            self.noise_scale_tracker.load_state_dict(saved["noise_scale"])
            self._last_window_size = saved["last_window_size"]
        if self.model is not None:
            self._load_batchnorm_windows(self.model, batchnorm)
        self._sync_next()

    def _load_plain_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A ``torch.optim`` state dict (from a run before the wrapper): load it into the
        wrapped optimizer and start a fresh window, as at a boundary."""
        in_progress = self._micro_step
        self.optimizer.load_state_dict(state_dict)  # validates before it changes anything
        self.sync_masters()  # masters follow the (just loaded) model parameters
        self._drop_window()
        if in_progress:
            warnings.warn(
                f"fastaccum: loading a torch.optim state dict discarded the {in_progress} "
                "micro-batch(es) of the window in progress; it starts a new window",
                RuntimeWarning,
                stacklevel=_user_stacklevel(),
            )

    def _load_batchnorm_windows(
        self, model: torch.nn.Module, states: list[dict[str, Any]] | None
    ) -> None:
        if states is not None:
            load_window_state_dict(model, states)
            return
        # Saved without model= (or before window states were saved): whatever window the
        # modules hold now is not the checkpoint's; start it empty.
        end_window(model, discard=True)
        if self._micro_step > 0 and accum_batchnorms(model):
            warnings.warn(
                "fastaccum: the state dict was saved mid-window without AccumBatchNorm "
                "window statistics (no model= when it was saved); this window's running "
                "statistics will cover only the micro-batches after the resume",
                RuntimeWarning,
                stacklevel=_user_stacklevel(),
            )
