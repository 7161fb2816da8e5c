"""One saved-tensor pipeline for the activations kept for backward: keep, quantize, store as
a 1-bit mask, offload, or recompute.

PyTorch runs only the innermost pair of ``saved_tensors_hooks``, so compression, offload
and checkpointing that each install their own hooks cannot be stacked. Here they are one
pipeline: :class:`ActivationPolicy` decides per saved tensor, and :func:`checkpoint`
recomputes its region with the same decisions (its recomputed tensors are compressed too,
and the region's inputs are saved through the policy that is active around it).

Per saved tensor, in this order:

1. empty, integer or complex tensors, parameters (and views or casts of them), tensors
   smaller than ``min_bytes``, tensors that are not plain strided tensors (sparse, nested,
   tensor subclasses) and views whose storage is smaller than their dense size (expanded,
   stride-0 or overlapping views, which a compressed copy would make larger) are kept as
   they are;
2. with ``masks``: bool tensors, float tensors that need no gradient and hold only +0.0
   and one positive finite value (0/1 masks, dropout's 0 or ``1 / (1 - p)``), and the
   output ReLU saves (its backward needs only ``output > 0``) become 1-bit masks, which is
   lossless;
3. with ``bits``: float32/bfloat16/float16 tensors are quantized per group
   (:func:`fastaccum.ops.quantize.quantize_groups`), with seeded stochastic rounding so the
   stored value is unbiased; other dtypes are kept;
4. with ``offload``: what is stored for a CUDA tensor moves to pinned host memory
   (:mod:`fastaccum.memory.offload`); CPU tensors stay where they are.

A tensor saved by several ops (same tensor, same version) is stored once.

In-place changes after saving: like PyTorch, unpacking a saved tensor that was modified in
place after it was saved raises RuntimeError. For tensors kept as they are this is always
detected (their version counter is shared). A compressed or copied tensor is not held, so
it is checked through a weak reference to the tensor that was saved: a change made while
that tensor object is alive is detected; a change made only through another alias (a
``detach()``-ed tensor, or a view taken without autograd's view tracking) after the saved
tensor itself was freed is not, and backward then uses the values as they were saved.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.autograd.graph import saved_tensors_hooks

from fastaccum.memory.offload import HostCopy, PinnedPool, default_pool
from fastaccum.ops.quantize import (
    GROUP_SIZES,
    INPUT_DTYPES,
    QuantizedGroups,
    dequantize_groups,
    pack_mask,
    quantize_groups,
    unpack_mask,
)

_M64 = 2**64 - 1
_RELU_NODES = frozenset({"ReluBackward0"})
# Nodes that only view or cast their input: a tensor reached from a parameter through them
# is that parameter's data (e.g. a Linear's transposed weight, or its autocast copy).
_PASS_THROUGH_NODES = frozenset(
    {
        "TBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "TransposeBackward0",
        "PermuteBackward0",
        "ExpandBackward0",
        "AliasBackward0",
        "ToCopyBackward0",
    }
)


def _splitmix64(x: int) -> int:
    """A 64-bit mixing function, to derive independent per-tensor seeds from one seed."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _derive_seed(base: int, index: int) -> int:
    """Seed of the ``index``-th quantized tensor of a stream, in ``[0, 2**63)``."""
    return _splitmix64(base ^ _splitmix64(index)) >> 1


# --------------------------------------------------------------------------- the policy


class ActivationPolicy:
    """What to do with the tensors autograd saves for backward.

    Use it as a context manager around the forward pass (``with policy:`` or
    ``with fastaccum.save_activations(policy):``), or attach it to a module with
    :meth:`attach`. Backward may run after the block has ended.

    Args:
        bits: 8, 4 or 2 to quantize float activations per group; None keeps their values.
        offload: move what is stored for CUDA tensors to pinned host memory, copied on a
            side stream and prefetched ahead of backward. A no-op for CPU tensors.
        min_bytes: tensors smaller than this (bytes) are kept as they are.
        group_size: elements sharing one float32 scale and minimum (power of two, 32..4096).
            Storage per element is ``bits / 8 + 8 / group_size`` bytes.
        stochastic_rounding: unbiased stochastic rounding (default); else round to nearest.
        seed: seed of the rounding; each forward pass (session) and each tensor in it get
            their own derived seed, so a rerun with the same seed is bit-identical.
        masks: store bool tensors, 0/1 float tensors that need no gradient and ReLU outputs
            as 1-bit masks (lossless).
        prefetch: offloaded records copied back ahead of the one backward is reading.
        pool: pinned buffer pool for offload (default: one per process).

    Raises:
        TypeError, ValueError: on an argument of the wrong type or out of range.
    """

    def __init__(
        self,
        bits: int | None = 8,
        *,
        offload: bool = False,
        min_bytes: int = 32 * 1024,
        group_size: int = 256,
        stochastic_rounding: bool = True,
        seed: int = 0,
        masks: bool = True,
        prefetch: int = 2,
        pool: PinnedPool | None = None,
    ) -> None:
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int)):
            raise TypeError(f"bits must be an int or None, got {type(bits).__name__}")
        if bits not in (None, 2, 4, 8):
            raise ValueError(f"bits must be 8, 4, 2 or None, got {bits}")
        for name, value in (("min_bytes", min_bytes), ("seed", seed), ("prefetch", prefetch)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if group_size not in GROUP_SIZES:
            raise ValueError(
                f"group_size must be a power of two from {GROUP_SIZES[0]} to "
                f"{GROUP_SIZES[-1]}, got {group_size!r}"
            )
        if pool is not None and not isinstance(pool, PinnedPool):
            raise TypeError(f"pool must be a PinnedPool, got {type(pool).__name__}")
        flags = (
            ("offload", offload),
            ("stochastic_rounding", stochastic_rounding),
            ("masks", masks),
        )
        for name, flag in flags:
            # A string such as "no" would be truthy: only real bools are taken.
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool (True or False), got {type(flag).__name__}")
        self.bits = bits
        self.offload = offload
        self.min_bytes = min_bytes
        self.group_size = group_size
        self.stochastic_rounding = stochastic_rounding
        self.seed = seed
        self.masks = masks
        self.prefetch = prefetch
        self.pool = pool
        self._sessions_started = 0
        self._lock = threading.Lock()
        self._open: list[Session] = []

    def __repr__(self) -> str:
        return (
            f"ActivationPolicy(bits={self.bits}, offload={self.offload}, "
            f"min_bytes={self.min_bytes}, group_size={self.group_size}, "
            f"stochastic_rounding={self.stochastic_rounding}, seed={self.seed}, "
            f"masks={self.masks})"
        )

    def _next_seed_base(self) -> int:
        with self._lock:
            index = self._sessions_started
            self._sessions_started += 1
        return _splitmix64(self.seed ^ _splitmix64(index))

    def session(self) -> Session:
        """A new session of this policy (a context manager); one per forward pass."""
        return Session(self)

    def __enter__(self) -> ActivationPolicy:
        s = self.session()
        s.__enter__()
        self._open.append(s)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._open:
            raise RuntimeError("ActivationPolicy.__exit__ without a matching __enter__")
        self._open.pop().__exit__(*exc)

    def attach(self, module: torch.nn.Module) -> _Attachment:
        """Apply this policy to every forward pass of ``module`` (through forward hooks).

        Returns a handle whose ``remove()`` detaches it. This is how an optimizer wrapper
        can take ``activations=policy``: ``handle = policy.attach(model)``.
        """
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        return _Attachment(self, module)


class _Attachment:
    """Forward pre-hook opens a session, forward hook (always called) closes it."""

    def __init__(self, policy: ActivationPolicy, module: torch.nn.Module) -> None:
        self._sessions: list[Session | None] = []

        def enter(mod: torch.nn.Module, args: Any) -> None:
            measurement = _measurement()
            if measurement is not None and measurement.replace_attached:
                # saved_bytes(..., policy=other) measures that policy in this one's place.
                self._sessions.append(None)
                return
            s = policy.session()
            s.__enter__()
            self._sessions.append(s)

        def leave(mod: torch.nn.Module, args: Any, output: Any) -> None:
            if self._sessions:
                s = self._sessions.pop()
                if s is not None:
                    s.__exit__(None, None, None)

        self._handles = [
            module.register_forward_pre_hook(enter),
            module.register_forward_hook(leave, always_call=True),
        ]

    def remove(self) -> None:
        """Detach the policy from the module."""
        for h in self._handles:
            h.remove()
        self._handles = []


def save_activations(policy: ActivationPolicy | None = None, **kwargs: Any) -> Session:
    """Context manager applying ``policy`` (or ``ActivationPolicy(**kwargs)``) to the
    tensors saved for backward inside the block.

    ``with fastaccum.save_activations(fastaccum.ActivationPolicy(bits=8)): loss = model(x)``;
    ``loss.backward()`` may follow outside the block. The session it returns counts what it
    stored (:attr:`Session.stats`). Raises TypeError when ``policy`` is not a policy.
    """
    if policy is None:
        policy = ActivationPolicy(**kwargs)
    elif kwargs:
        raise TypeError("pass either a policy or keyword arguments for one, not both")
    if not isinstance(policy, ActivationPolicy):
        raise TypeError(f"policy must be an ActivationPolicy, got {type(policy).__name__}")
    return policy.session()


# --------------------------------------------------------------------------- records


def _flatten_dense(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], list[int] | None]:
    """``t`` as a flat tensor in memory order, with what :func:`_restore` needs to give
    back the same shape and strides (a permutation for dense non-contiguous layouts)."""
    if t.is_contiguous():
        return t.reshape(-1), tuple(t.shape), None
    strides = t.stride()
    perm = sorted(range(t.dim()), key=lambda d: -strides[d])
    permuted = t.permute(perm)
    if permuted.is_contiguous():
        return permuted.reshape(-1), tuple(permuted.shape), perm
    return t.contiguous().reshape(-1), tuple(t.shape), None


def _restore(flat: torch.Tensor, shape: tuple[int, ...], perm: list[int] | None) -> torch.Tensor:
    out = flat.view(shape)
    if perm is None:
        return out
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return out.permute(inverse)


def _modified_in_place(t: torch.Tensor, saved_version: int) -> RuntimeError:
    # Starts with PyTorch's own wording, so that searches for it find this case too.
    return RuntimeError(
        "one of the variables needed for gradient computation has been modified by an "
        f"inplace operation: a {t.dtype} tensor of shape {tuple(t.shape)}, saved for backward "
        f"under fastaccum.save_activations, is at version {t._version}; expected version "
        f"{saved_version} instead. It was modified in place after it was saved for backward: "
        "clone it before the in-place operation (or use the out-of-place operation)."
    )


@dataclass
class _Kept:
    """A tensor held as it is, with its version when it was saved.

    ``tensor`` is a ``detach()``-ed alias: same storage and same version counter (so any
    in-place change is seen), but no ``grad_fn``. Holding the saved tensor itself would make
    a reference cycle when an op saves its own output (output -> grad_fn -> this record ->
    output) that the garbage collector cannot break: a graph dropped without backward
    would never be freed.
    """

    tensor: torch.Tensor
    version: int

    def get(self) -> torch.Tensor:
        """The tensor; RuntimeError when it was modified in place after it was saved."""
        if self.tensor._version != self.version:
            raise _modified_in_place(self.tensor, self.version)
        return self.tensor


def keep_as_is(t: torch.Tensor) -> _Kept:
    """What a saved-tensor hook stores to keep ``t`` as it is (see :class:`_Kept`)."""
    return _Kept(t.detach(), t._version)


@dataclass
class _Source:
    """The saved tensor behind a compressed or copied record, held weakly (holding it would
    keep the memory the record saves), and its version when it was saved."""

    ref: weakref.ref
    version: int

    def check(self) -> None:
        """RuntimeError when the saved tensor is still alive and was modified in place."""
        t = self.ref()
        if t is not None and t._version != self.version:
            raise _modified_in_place(t, self.version)


@dataclass
class _Quantized:
    data: list[torch.Tensor] | HostCopy  # packed, scale, minimum
    bits: int
    group_size: int
    numel: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    perm: list[int] | None
    source: _Source

    def decode(self, data: list[torch.Tensor]) -> torch.Tensor:
        # ``data`` is the (packed, scale, minimum) triple; dequantize_groups unpacks any.
        q = cast(QuantizedGroups, data)
        flat = dequantize_groups(q, self.bits, self.group_size, self.numel, self.dtype)
        return _restore(flat, self.shape, self.perm)


@dataclass
class _Mask:
    data: list[torch.Tensor] | HostCopy  # packed bits
    numel: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    perm: list[int] | None
    value: float  # what a set bit stands for (1, or dropout's 1 / (1 - p)); positive, finite
    source: _Source

    def decode(self, data: list[torch.Tensor]) -> torch.Tensor:
        flat = unpack_mask(data[0], self.numel, self.dtype)
        if self.value != 1.0:
            flat = flat * self.value
        return _restore(flat, self.shape, self.perm)


@dataclass
class _Raw:
    data: list[torch.Tensor] | HostCopy
    shape: tuple[int, ...]
    perm: list[int] | None
    source: _Source

    def decode(self, data: list[torch.Tensor]) -> torch.Tensor:
        return _restore(data[0], self.shape, self.perm)


_Record = _Quantized | _Mask | _Raw


@dataclass
class SessionStats:
    """What a session stored: counts of saved tensors and bytes, by decision.

    ``saved`` counts every tensor autograd handed over. Bytes are of what is held on the
    tensors' device (``host_bytes``: offloaded, in pinned
    host memory), not deduplicated across views of one storage (:func:`saved_bytes` is).
    """

    saved: int = 0
    kept: int = 0
    quantized: int = 0
    masks: int = 0
    offloaded: int = 0
    reused: int = 0
    input_bytes: int = 0
    stored_bytes: int = 0
    host_bytes: int = 0


# The next autograd sequence number of this thread (private torch API; without it the
# ReLU rule is off, which only costs memory).
_NEXT_SEQUENCE_NR: Callable[[], int] | None = getattr(torch._C._autograd, "_get_sequence_nr", None)


def _is_relu_own_save(t: torch.Tensor) -> bool:
    """True when ReLU itself is saving its output ``t`` (its backward needs only t > 0).

    ReLU saves its output right after its node is created, before any other node exists:
    the node's sequence number is then the last one handed out in this thread. Any later
    save of the same tensor (by the op that consumes it) comes after that op's node.
    """
    node = t.grad_fn
    if node is None or _NEXT_SEQUENCE_NR is None or type(node).__name__ not in _RELU_NODES:
        return False
    return node._sequence_nr() == _NEXT_SEQUENCE_NR() - 1


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse layouts, some tensor subclasses
        return None


def tensor_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The strided tensors holding ``t``'s data: its indices and values when it is sparse,
    else ``t`` itself."""
    if t.layout == torch.sparse_coo:
        return [t._indices(), t._values()]
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return [t.crow_indices(), t.col_indices(), t.values()]
    if t.layout in (torch.sparse_csc, torch.sparse_bsc):
        return [t.ccol_indices(), t.row_indices(), t.values()]
    return [t]


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s elements (of its indices and values when it is sparse)."""
    return sum(part.numel() * part.element_size() for part in tensor_parts(t))


def parameter_data(t: torch.Tensor) -> str | None:
    """How ``t`` relates to the model's parameters, for what saving it costs.

    ``"parameter"``: a parameter or another leaf that requires grad, or a view of one: its
    memory is held anyway. ``"cast"``: a copy of an ``nn.Parameter`` made by a cast (and
    maybe viewed), e.g. autocast's bfloat16 weight: new memory, which the graph holds until
    backward. None: anything else.
    """
    for c in (t, t._base):
        if c is not None and (isinstance(c, torch.nn.Parameter) or (c.is_leaf and c.requires_grad)):
            return "parameter"
    node = t.grad_fn
    for _ in range(4):
        if node is None or type(node).__name__ not in _PASS_THROUGH_NODES:
            return None
        inputs = [f for f, _ in node.next_functions if f is not None]
        if len(inputs) != 1:
            return None
        node = inputs[0]
        if type(node).__name__ == "AccumulateGrad":
            # AccumulateGrad nodes hold their leaf; torch's Node stub does not declare it.
            leaf = node.variable  # type: ignore[attr-defined]
            if not isinstance(leaf, torch.nn.Parameter):
                return None
            ptr = _storage_ptr(t)
            return "parameter" if ptr is not None and ptr == _storage_ptr(leaf) else "cast"
    return None


def _is_parameter_like(t: torch.Tensor) -> bool:
    """True for parameters and other leaves that require grad (their memory is held
    anyway), views of them, and view/cast chains that end at an ``nn.Parameter`` (a cast is
    new memory, but a weight's, which the caller holds in full precision already)."""
    return parameter_data(t) is not None


# Float dtypes a {0, c} tensor may be stored as a mask for, with the integer dtype of the
# same width: a bitwise-zero element (an int view of 0) is +0.0, which the mask gives back.
_MASK_INT_VIEWS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def _overlaps(t: torch.Tensor) -> bool:
    """True when ``t``'s storage holds fewer bytes than its elements (an expanded, stride-0
    or overlapping view): a compressed copy of its elements could be larger than it."""
    return t.untyped_storage().nbytes() < t.numel() * t.element_size()


class Encoder:
    """The per-tensor decisions of one policy, with one stream of rounding seeds.

    ``encode(t)`` returns what autograd should hold (a :class:`_Kept` alias when ``t`` is
    kept as it is, else a record); ``decode`` gives a tensor back, and raises RuntimeError
    when the tensor was modified in place after it was saved (see the module docstring).
    Sessions and :func:`checkpoint` recomputations each use their own encoder; a
    recomputation rebuilt from the same seed base draws the same seeds.
    """

    def __init__(self, policy: ActivationPolicy | None, seed_base: int) -> None:
        self.policy = policy
        self.seed_base = seed_base
        self.stats = SessionStats()
        self._quantized_count = 0
        self._seen: dict[tuple, tuple[weakref.ref, dict[str, Any]]] = {}
        self._offloaded: list[weakref.ref] = []
        self.track: list[tuple[str, Any]] | None = None

    def next_seed_base(self) -> int:
        """A fresh seed base for a nested stream (a checkpoint region)."""
        self._quantized_count += 1
        return _derive_seed(self.seed_base, self._quantized_count) | 1

    def keeps(self, t: torch.Tensor) -> bool:
        """True when ``t`` is kept as it is whatever else the policy says."""
        p = self.policy
        if p is None or _is_parameter_like(t):
            return True
        # Sparse, nested and subclassed tensors (and meta ones) have no plain storage to
        # compress from, and a record would decode to a plain dense tensor.
        if t.layout != torch.strided or t.is_nested or type(t) is not torch.Tensor or t.is_meta:
            return True
        if t.numel() == 0 or _overlaps(t):
            return True
        if t.dtype == torch.bool:
            return not p.masks or t.numel() < p.min_bytes
        if not t.is_floating_point():
            return True
        return t.numel() * t.element_size() < p.min_bytes

    def _kind(self, t: torch.Tensor) -> tuple[str, float]:
        """The decision for ``t``, and for masks the value the set bits stand for."""
        p = cast(ActivationPolicy, self.policy)  # only asked when keeps(t) was False
        if p.masks:
            if t.dtype == torch.bool:
                return "mask", 1.0
            int_view = _MASK_INT_VIEWS.get(t.dtype)
            if not t.requires_grad and int_view is not None:
                # Two-valued {0, c} tensors that need no gradient: dropout's scaled keep
                # mask (0 or 1 / (1 - p)) and 0/1 masks. The mask stores x > 0 and decodes
                # to bit * c, so it is exact only for a positive finite c (a negative c
                # would come back as 0, and 0 * inf is NaN) and for zeros that are +0.0
                # (bitwise zero: a -0.0 would come back as +0.0). All +0.0 is exact too.
                # One extra read, and a sync on GPU.
                top = t.amax()
                zero = t.view(int_view) == 0
                two_valued = (top > 0) & top.isfinite() & (zero | (t == top)).all()
                if bool(two_valued | zero.all()):
                    return "mask", top.item()
        if p.bits is not None and t.dtype in INPUT_DTYPES:
            return "quantize", 1.0
        return "raw", 1.0

    def encode(self, t: torch.Tensor) -> Any:
        """What to store for ``t`` (see the module docstring for the order of decisions)."""
        self.stats.saved += 1
        self.stats.input_bytes += tensor_nbytes(t)
        if self.keeps(t):
            self.stats.kept += 1
            kept = keep_as_is(t)
            if self.track is not None:
                self._note(parameter_data(t) or "kept", kept.tensor)
            return kept
        key = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
            t.device,
            t._version,
        )
        ref, entry = self._seen.get(key, (None, {}))
        if ref is None or ref() is not t:
            entry = {}
            self._seen[key] = (weakref.ref(t, self._forget(key)), entry)
        p = cast(ActivationPolicy, self.policy)  # keeps(t) is True without a policy
        relu = p.masks and _is_relu_own_save(t)
        slot = "mask" if relu else "full"
        if slot in entry:
            self.stats.reused += 1
            return entry[slot]
        kind, mask_value = ("relu", 1.0) if relu else self._kind(t)
        if kind == "raw" and not (p.offload and t.is_cuda):
            # Neither compressed nor offloaded: autograd holds the tensor itself.
            self.stats.kept += 1
            kept = keep_as_is(t)
            self._note("kept", kept.tensor)
            return kept
        record = self._make_record(t, kind, mask_value)
        entry[slot] = record
        return record

    def _forget(self, key: tuple) -> Callable[[weakref.ref], None]:
        seen = self._seen

        def forget(ref: weakref.ref) -> None:
            item = seen.get(key)
            if item is not None and item[0] is ref:
                del seen[key]

        return forget

    def _make_record(self, t: torch.Tensor, kind: str, mask_value: float) -> _Record:
        p = cast(ActivationPolicy, self.policy)  # only called from encode (policy set)
        flat, shape, perm = _flatten_dense(t.detach())
        source = _Source(weakref.ref(t), t._version)
        data: list[torch.Tensor]
        if kind in ("mask", "relu"):
            data = [pack_mask(flat)]
            record: _Record = _Mask(data, flat.numel(), t.dtype, shape, perm, mask_value, source)
            self.stats.masks += 1
        elif kind == "quantize":
            self._quantized_count += 1
            seed = _derive_seed(self.seed_base, self._quantized_count)
            bits = cast(int, p.bits)  # _kind chose "quantize" only with bits set
            q = quantize_groups(
                flat, bits, p.group_size, seed=seed, stochastic=p.stochastic_rounding
            )
            data = list(q)
            record = _Quantized(
                data, bits, p.group_size, flat.numel(), t.dtype, shape, perm, source
            )
            self.stats.quantized += 1
        else:
            data = [flat]
            record = _Raw(data, shape, perm, source)
        stored = sum(x.numel() * x.element_size() for x in data)
        if p.offload and t.is_cuda:
            record.data = HostCopy(data, p.pool or default_pool())
            self._offloaded.append(weakref.ref(record.data))
            self.stats.offloaded += 1
            self.stats.host_bytes += stored
            self._note("host", record.data)
        else:
            self.stats.stored_bytes += stored
            self._note(kind, record.data)
        return record

    def _note(self, kind: str, data: Any) -> None:
        # ``data`` must not hold a grad_fn: the graph holds this encoder (through the unpack
        # hook), so a tensor of the graph held here would be a cycle through autograd's
        # C++ nodes, which the garbage collector cannot break.
        if self.track is not None:
            self.track.append((kind, data))

    def decode(self, stored: Any) -> torch.Tensor:
        """The tensor for what :meth:`encode` returned.

        Raises RuntimeError when the saved tensor was modified in place after it was saved
        (for a compressed one: while it is still alive, see the module docstring).
        """
        if isinstance(stored, _Kept):
            return stored.get()
        stored.source.check()
        data = stored.data
        if isinstance(data, HostCopy):
            self._prefetch_before(data)
            data = data.fetch()
        return stored.decode(data)

    def _prefetch_before(self, copy: HostCopy) -> None:
        """Start copying back the records saved just before ``copy``: backward reads them
        next (it runs roughly in reverse order of the forward)."""
        depth = self.policy.prefetch if self.policy is not None else 0
        refs = self._offloaded
        for i in range(len(refs) - 1, -1, -1):
            if refs[i]() is copy:
                for ref in refs[max(0, i - depth) : i]:
                    other = ref()
                    if other is not None:
                        other.prefetch()
                return

    def prefetch_last(self) -> None:
        """Start copying back the last offloaded records (called when the forward ends)."""
        depth = self.policy.prefetch if self.policy is not None else 0
        for ref in self._offloaded[-depth:] if depth else []:
            copy = ref()
            if copy is not None:
                copy.prefetch()


class Session:
    """One application of a policy: installs the saved-tensor hooks while it is entered."""

    def __init__(self, policy: ActivationPolicy) -> None:
        self.policy = policy
        measurement = _measurement()
        if measurement is None:
            self.encoder = Encoder(policy, policy._next_seed_base())
        else:
            # A measurement draws no session from the policy's seed stream, so that the
            # sessions after it round as they would have without it (the byte counts do
            # not depend on the seeds).
            self.encoder = Encoder(policy, _splitmix64(policy.seed))
            measurement.adopt(self.encoder)
        # The hooks read autograd's graph (grad_fn, parameters): under torch.compile they
        # run eagerly, never traced.
        reason = "fastaccum.save_activations' hooks read autograd's graph"
        self._hooks = saved_tensors_hooks(
            torch.compiler.disable(self.encoder.encode, reason=reason),
            torch.compiler.disable(self.encoder.decode, reason=reason),
        )
        self._entered = False

    @property
    def stats(self) -> SessionStats:
        """Counts and bytes of what this session stored so far."""
        return self.encoder.stats

    def __enter__(self) -> Session:
        if self._entered:
            raise RuntimeError("a Session can be entered once; start a new one per forward")
        self._entered = True
        self._hooks.__enter__()
        _active().append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        stack = _active()
        if stack and stack[-1] is self:
            stack.pop()
        self._hooks.__exit__(*exc)
        self.encoder.prefetch_last()
        # Tensors saved again after this point belong to another session.
        self.encoder._seen.clear()


_local = threading.local()


def _active() -> list[Session]:
    """This thread's open sessions, innermost last."""
    if not hasattr(_local, "sessions"):
        _local.sessions = []
    return _local.sessions


def active_session() -> Session | None:
    """The innermost session open in this thread, or None."""
    stack = _active()
    return stack[-1] if stack else None


class Measurement:
    """What the sessions opened in this thread during a :func:`measuring` block stored.

    ``track`` holds (decision, stored data) pairs from every such session, including those
    a policy attached to a module opens; ``encoders`` the sessions' encoders.
    """

    def __init__(self, replace_attached: bool) -> None:
        self.replace_attached = replace_attached
        self.track: list[tuple[str, Any]] = []
        self.encoders: list[Encoder] = []

    def adopt(self, encoder: Encoder) -> None:
        encoder.track = self.track
        self.encoders.append(encoder)


def _measurement() -> Measurement | None:
    return getattr(_local, "measurement", None)


@contextlib.contextmanager
def measuring(replace_attached: bool) -> Iterator[Measurement]:
    """Collect what every session opened in this thread inside the block stores.

    Sessions opened inside draw no seed from their policy's stream. With
    ``replace_attached``, policies attached to modules (:meth:`ActivationPolicy.attach`)
    open no session: the session around the call applies in their place.
    """
    outer = _measurement()
    _local.measurement = Measurement(replace_attached)
    try:
        yield _local.measurement
    finally:
        _local.measurement = outer


def iter_tracked(encoder: Encoder) -> Iterator[tuple[str, Any]]:
    """(decision, stored data) pairs an encoder noted while ``track`` was a list."""
    return iter(encoder.track or [])
