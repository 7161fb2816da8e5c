"""Per-group min/max quantization of activations, with bit packing and seeded stochastic
rounding; 1-bit masks.

This module holds, for this op family:

- the typed wrappers (:func:`quantize_groups`, :func:`dequantize_groups`, :func:`pack_mask`,
  :func:`unpack_mask`), which validate, then route through :mod:`fastaccum._backend`;
- the fake (meta) kernels of ``torch.ops.fastaccum.quantize_groups`` /
  ``dequantize_groups``, for ``torch.compile`` and ``torch.library.opcheck``;
- the pure-PyTorch references (``*_ref``): the spec every backend is tested against, and
  the fallback when no kernel can run.

Format (``x`` read flat, in row-major order, ``n`` elements, ``G = ceil(n / group_size)``
groups, ``L = 2**bits - 1`` levels), every step in float32:

- per group: ``mn = min``, ``mx = max``, ``scale = (mx - mn) / L``, ``inv = L / (mx - mn)``
  (``0`` when that is not finite, i.e. a constant group);
- per element: ``y = (x - mn) * inv``; ``q = min(trunc(y + u), L)`` with ``u`` uniform in
  ``[0, 1)`` (stochastic rounding, so ``E[mn + q * scale] = x``) or ``u = 0.5`` (nearest);
- ``u`` is a hash of ``(seed, element index)``: the same seed gives the same codes on every
  backend and every call, so recomputation and replays match;
- a group holding a NaN or +-Inf (or whose range overflows) gets ``scale = min = NaN`` and
  codes 0, so it dequantizes to NaN and non-finite values still reach the gradients;
- codes are packed ``8 // bits`` to a byte, the first element in the lowest bits; each group
  fills ``group_size * bits / 8`` bytes (a short last group is padded with code 0);
- dequantization: ``mn + q * scale`` in float32, cast to the requested dtype.

Storage per element: ``bits / 8`` bytes plus 8 bytes (float32 scale and minimum) per group,
e.g. 1.03 bytes at 8 bits and 0.28 at 2 bits with ``group_size=256``.

Masks: :func:`pack_mask` stores ``x > 0`` (``x`` for bool tensors) as one bit per element,
eight to a byte, the first element in the lowest bit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fastaccum import _backend

BITS = (2, 4, 8)
"""Supported code widths."""
GROUP_SIZES = tuple(2**k for k in range(5, 13))
"""Supported group sizes: powers of two from 32 to 4096."""
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SEED_LIMIT = 2**63
_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


class QuantizedGroups(NamedTuple):
    """Codes and per-group parameters of :func:`quantize_groups`.

    ``packed``: uint8 ``[G * group_size * bits / 8]``; ``scale``, ``minimum``: float32 ``[G]``.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor


def num_groups(numel: int, group_size: int) -> int:
    """Groups of ``group_size`` elements that ``numel`` elements fill (the last may be short)."""
    return -(-numel // group_size)


def quantized_nbytes(numel: int, bits: int, group_size: int) -> int:
    """Bytes :func:`quantize_groups` stores for ``numel`` elements (codes, scales, minima)."""
    groups = num_groups(numel, group_size)
    return groups * (group_size * bits // 8 + 8)


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def check_quantize_args(bits: int, group_size: int, seed: int) -> None:
    """Raise TypeError/ValueError on an unsupported ``bits``, ``group_size`` or ``seed``."""
    if _check_int("bits", bits) not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if _check_int("group_size", group_size) not in GROUP_SIZES:
        raise ValueError(
            f"group_size must be a power of two from {GROUP_SIZES[0]} to {GROUP_SIZES[-1]}, "
            f"got {group_size}"
        )
    if not 0 <= _check_int("seed", seed) < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def _check_input(x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; expected one of float32, bfloat16, float16")
    return x


def check_dequantize_args(
    q: QuantizedGroups, bits: int, group_size: int, numel: int, dtype: torch.dtype
) -> None:
    """Raise TypeError/ValueError when ``q`` cannot hold ``numel`` values of this format."""
    check_quantize_args(bits, group_size, 0)
    if _check_int("numel", numel) < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if dtype not in INPUT_DTYPES:
        raise TypeError(f"dtype must be one of float32, bfloat16, float16, got {dtype}")
    packed, scale, minimum = q
    groups = num_groups(numel, group_size)
    want = groups * group_size * bits // 8
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != want:
        raise ValueError(
            f"packed must be a 1-D uint8 tensor of {want} bytes for {numel} values at {bits} "
            f"bits in groups of {group_size}, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    for name, t in (("scale", scale), ("minimum", minimum)):
        if t.dtype != torch.float32 or t.dim() != 1 or t.numel() != groups:
            raise ValueError(
                f"{name} must be a 1-D float32 tensor of {groups} groups, got {t.dtype} of "
                f"shape {tuple(t.shape)}"
            )
        if t.device != packed.device:
            raise ValueError(f"{name} is on {t.device} but packed is on {packed.device}")


# --------------------------------------------------------------------------- references


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) on int64 tensors holding uint32s."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    # Overflows int64 and wraps; the low 32 bits, all that is kept, are still exact.
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def rounding_offsets(seed: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The stochastic-rounding offsets ``u`` in ``[0, 1)`` (float32) of elements ``0..numel-1``.

    ``key = mix(seed_lo ^ mix((seed_hi ^ index_hi) + 0x9E3779B9))``,
    ``u = (mix(index_lo ^ key) >> 8) * 2**-24``: 24 random bits, exact in float32.
    """
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    seed_lo = torch.tensor(seed & _MASK32, dtype=torch.int64, device=device)
    seed_hi = seed >> 32
    key = _mix32(((seed_hi ^ (idx >> 32)) + _GOLDEN) & _MASK32)
    key = _mix32(seed_lo ^ key)
    h = _mix32((idx & _MASK32) ^ key)
    return (h >> 8).to(torch.float32) * 2.0**-24


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


def quantize_groups_ref(
    x: torch.Tensor, bits: int, group_size: int = 256, seed: int = 0, stochastic: bool = True
) -> QuantizedGroups:
    """Pure-PyTorch :func:`quantize_groups`: the spec (format in the module docstring)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    groups = num_groups(n, group_size)
    levels = float(2**bits - 1)
    device = flat.device
    v = torch.nn.functional.pad(flat, (0, groups * group_size - n)).view(groups, group_size)
    valid = (torch.arange(groups * group_size, device=device) < n).view(groups, group_size)
    inf = torch.tensor(math.inf, device=device)
    mn = torch.where(valid, v, inf).amin(1) if groups else flat.new_zeros(0)
    mx = torch.where(valid, v, -inf).amax(1) if groups else flat.new_zeros(0)
    rng = mx - mn
    bad = ~torch.isfinite(rng)  # a NaN/Inf element or an overflowing range
    # Tensor / tensor: ``levels / rng`` with a Python number would run as
    # ``rng.reciprocal() * levels``, two roundings where the kernels have one.
    levels_t = torch.full_like(rng, levels)
    scale = rng / levels_t
    inv = levels_t / rng
    inv = torch.where(torch.isfinite(inv), inv, torch.zeros_like(inv))
    y = (v - mn[:, None]) * inv[:, None]
    if stochastic:
        u = rounding_offsets(seed, groups * group_size, device).view(groups, group_size)
    else:
        u = torch.full_like(v, 0.5)
    q = torch.clamp(torch.trunc(y + u), max=levels)
    q = torch.where(valid & ~bad[:, None], q, torch.zeros_like(q)).to(torch.uint8)
    nan = torch.full_like(scale, math.nan)
    per_byte = 8 // bits
    q = q.view(groups, group_size // per_byte, per_byte)
    packed = (q << _shifts(bits, device)).sum(-1, dtype=torch.uint8).reshape(-1)
    return QuantizedGroups(
        packed, torch.where(bad, nan, scale), torch.where(bad, nan, mn).contiguous()
    )


def dequantize_groups_ref(
    q: QuantizedGroups, bits: int, group_size: int, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    """Pure-PyTorch :func:`dequantize_groups`: ``mn + code * scale`` per element, flat."""
    packed, scale, minimum = q
    groups = scale.numel()
    shifts = _shifts(bits, packed.device)
    codes = (packed.view(groups, group_size * bits // 8)[..., None] >> shifts) & (2**bits - 1)
    codes = codes.reshape(groups, group_size).float()
    out = minimum[:, None] + codes * scale[:, None]
    return out.reshape(-1)[:numel].to(dtype)


def pack_mask_ref(x: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch :func:`pack_mask`."""
    bits = (x if x.dtype == torch.bool else x > 0).reshape(-1)
    bits = torch.nn.functional.pad(bits.to(torch.uint8), (0, -bits.numel() % 8))
    return (bits.view(-1, 8) << _shifts(1, x.device)).sum(-1, dtype=torch.uint8)


def unpack_mask_ref(packed: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Pure-PyTorch :func:`unpack_mask`."""
    bits = (packed[:, None] >> _shifts(1, packed.device)) & 1
    return bits.reshape(-1)[:numel].to(dtype)


# --------------------------------------------------------------------------- fake kernels


def _register_fakes() -> None:
    @torch.library.register_fake("fastaccum::quantize_groups")
    def _quantize_fake(x, bits, group_size, seed, stochastic):
        groups = num_groups(x.numel(), group_size)
        return (
            x.new_empty(groups * group_size * bits // 8, dtype=torch.uint8),
            x.new_empty(groups, dtype=torch.float32),
            x.new_empty(groups, dtype=torch.float32),
        )

    @torch.library.register_fake("fastaccum::dequantize_groups")
    def _dequantize_fake(packed, scale, minimum, bits, group_size, numel, dtype):
        return packed.new_empty(numel, dtype=dtype)


if _backend.has_extension() and hasattr(torch.ops.fastaccum, "quantize_groups"):
    _register_fakes()


# --------------------------------------------------------------------------- wrappers


def quantize_groups(
    x: torch.Tensor,
    bits: int,
    group_size: int = 256,
    *,
    seed: int = 0,
    stochastic: bool = True,
    backend: str | None = None,
) -> QuantizedGroups:
    """Quantize ``x`` (read flat, row-major) to ``bits``-bit codes per group of elements.

    Args:
        x: float32/bfloat16/float16 tensor of any shape and strides (a non-contiguous
            tensor is read through a contiguous copy).
        bits: 8, 4 or 2.
        group_size: elements per group sharing one float32 scale and minimum (32..4096,
            a power of two).
        seed: stochastic-rounding seed in ``[0, 2**63)``; equal seeds give equal codes.
        stochastic: unbiased stochastic rounding (default), else round to nearest.
        backend: force ``"native"``, ``"triton"`` or ``"reference"``.

    Returns:
        :class:`QuantizedGroups`; :func:`quantized_nbytes` gives its size in bytes.

    Raises:
        TypeError, ValueError: on an unsupported dtype, ``bits``, ``group_size`` or ``seed``.
        RuntimeError: when a forced ``backend`` cannot run on ``x``'s device.
    """
    x = _check_input(x)
    check_quantize_args(bits, group_size, seed)
    flat = x.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    choice = _backend.select(x.device, backend, op="quantize_groups")
    if choice == _backend.NATIVE:
        out = torch.ops.fastaccum.quantize_groups(flat, bits, group_size, seed, stochastic)
    elif choice == _backend.TRITON:
        from fastaccum.triton.quantize import quantize_groups_triton

        out = quantize_groups_triton(flat, bits, group_size, seed, stochastic)
    else:
        return quantize_groups_ref(flat, bits, group_size, seed, stochastic)
    return QuantizedGroups(*out)


def dequantize_groups(
    q: QuantizedGroups,
    bits: int,
    group_size: int,
    numel: int,
    dtype: torch.dtype = torch.float32,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Values of :func:`quantize_groups` codes: a flat ``[numel]`` tensor of ``dtype``.

    ``bits``, ``group_size`` and ``numel`` must be those of the quantized tensor (reshape
    the result to its shape). Raises TypeError/ValueError when ``q`` does not match them,
    RuntimeError when a forced ``backend`` cannot run.
    """
    q = QuantizedGroups(*q)
    check_dequantize_args(q, bits, group_size, numel, dtype)
    choice = _backend.select(q.packed.device, backend, op="dequantize_groups")
    if choice == _backend.NATIVE:
        return torch.ops.fastaccum.dequantize_groups(*q, bits, group_size, numel, dtype)
    if choice == _backend.TRITON:
        from fastaccum.triton.quantize import dequantize_groups_triton

        return dequantize_groups_triton(*q, bits, group_size, numel, dtype)
    return dequantize_groups_ref(q, bits, group_size, numel, dtype)


def pack_mask(x: torch.Tensor) -> torch.Tensor:
    """One bit per element of ``x > 0`` (of ``x`` itself for bool), eight to a uint8 byte.

    Returns uint8 ``[ceil(numel / 8)]``. Raises TypeError for complex tensors.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"pack_mask needs a real or bool tensor, got {x.dtype}")
    return pack_mask_ref(x)


def unpack_mask(packed: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat ``[numel]`` tensor of ``dtype`` holding 1 (True) where the packed bit is set.

    Raises ValueError when ``packed`` (uint8, 1-D) holds fewer than ``numel`` bits.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() * 8 < numel:
        raise ValueError(
            f"packed must be a 1-D uint8 tensor of at least {math.ceil(numel / 8)} bytes, got "
            f"{packed.dtype} of shape {tuple(packed.shape)}"
        )
    return unpack_mask_ref(packed, numel, dtype)
