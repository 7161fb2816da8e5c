"""Counting the bytes a forward pass keeps for backward."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fastaccum.memory.offload import HostCopy
from fastaccum.memory.policy import ActivationPolicy, Session, measuring, tensor_parts


@dataclass(frozen=True)
class SavedBytes:
    """Bytes held for backward after one forward pass.

    ``total`` counts each storage once: the tensors autograd keeps, or what the policy
    stored in their place (codes, scales, masks), on the tensors' device. Parameters (and
    views of them) are not in ``total`` (the model holds them anyway) but in
    ``parameters``; copies of parameters made by a cast (autocast's low-precision weights)
    are new memory the graph holds until backward, so they are in ``total``, under
    ``by_kind["cast"]``. Offloaded data is in ``host`` (pinned host memory). ``by_kind``
    splits ``total`` into ``kept``, ``cast``, ``quantize``, ``mask`` and ``relu`` (ReLU
    masks). ``per_sample`` is ``total / batch_size``. A sparse tensor counts the bytes of
    its indices and values.
    """

    total: int
    per_sample: float
    batch_size: int
    parameters: int
    host: int
    saved_tensors: int
    by_kind: dict[str, int] = field(default_factory=dict)


def _storages(t: torch.Tensor) -> list[tuple[tuple, int]]:
    """(key, bytes) of the storages holding ``t``'s data; one key per storage."""
    out: list[tuple[tuple, int]] = []
    for part in tensor_parts(t):
        try:
            storage = part.untyped_storage()
            out.append((("storage", part.device, storage.data_ptr()), storage.nbytes()))
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            out.append((("tensor", id(t), len(out)), part.numel() * part.element_size()))
    return out


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim():
            return int(v.shape[0])
    raise ValueError("example_batch holds no tensor with a batch dimension")


def saved_bytes(
    model: torch.nn.Module | Any,
    example_batch: Any,
    policy: ActivationPolicy | None = None,
) -> SavedBytes:
    """Run one forward of ``model`` on ``example_batch`` and count what it saves for backward.

    Args:
        model: any callable (usually an ``nn.Module``, in the mode to measure: training
            mode for BatchNorm's batch statistics).
        example_batch: a tensor (``model(batch)``), a tuple/list (``model(*batch)``) or a
            dict (``model(**batch)``); its first tensor's first dimension is the batch size.
        policy: measure what this policy would store, in place of any policy attached to
            ``model`` or its submodules (:meth:`ActivationPolicy.attach`,
            ``fastaccum.wrap(..., activations=)``). None measures the forward as it runs:
            plain PyTorch (everything kept), or what an attached policy stores.

    Sessions the model's own code opens (``save_activations`` inside ``forward``) are
    counted as they store. The measurement draws no session from any policy's rounding-seed
    stream, so later seeded sessions round as they would have without it (the forward
    itself still runs: it draws from torch's RNG for dropout and updates BatchNorm's running
    statistics).

    Returns:
        :class:`SavedBytes`. The graph is freed before returning; no gradient is computed.

    Raises:
        TypeError: when ``model`` is not callable, ``example_batch`` is not a tensor, a
            tuple/list or a dict, or ``policy`` is not an :class:`~fastaccum.ActivationPolicy`.
        ValueError: when no tensor in ``example_batch`` has a batch dimension.
        RuntimeError: under ``torch.inference_mode()``, where nothing is saved for backward.
    """
    if not callable(model):
        raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")
    if not isinstance(example_batch, torch.Tensor | tuple | list | Mapping):
        raise TypeError(
            "example_batch must be a tensor (model(batch)), a tuple or list of positional "
            "arguments (model(*batch)) or a dict of keyword arguments (model(**batch)), got "
            f"{type(example_batch).__name__}"
        )
    if policy is not None and not isinstance(policy, ActivationPolicy):
        raise TypeError(f"policy must be an ActivationPolicy or None, got {type(policy).__name__}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "saved_bytes cannot measure under torch.inference_mode(): nothing is saved for "
            "backward there; call it outside the inference_mode block"
        )
    batch_size = _batch_size(example_batch)
    counting = policy if policy is not None else ActivationPolicy(bits=None, masks=False)
    with measuring(replace_attached=policy is not None) as measurement:
        session = Session(counting)
        with torch.enable_grad(), session:
            if isinstance(example_batch, torch.Tensor):
                out = model(example_batch)
            elif isinstance(example_batch, Mapping):
                out = model(**example_batch)
            else:
                out = model(*example_batch)
    seen: set[tuple] = set()
    by_kind: dict[str, int] = {}
    parameters = host = 0
    for kind, data in measurement.track:
        if isinstance(data, HostCopy):
            host += data.nbytes
            continue
        tensors = [data] if isinstance(data, torch.Tensor) else list(data)
        for t in tensors:
            for key, nbytes in _storages(t):
                if key in seen:
                    continue
                seen.add(key)
                if kind == "parameter":
                    parameters += nbytes
                else:
                    by_kind[kind] = by_kind.get(kind, 0) + nbytes
    del out
    total = sum(by_kind.values())
    return SavedBytes(
        total=total,
        per_sample=total / batch_size,
        batch_size=batch_size,
        parameters=parameters,
        host=host,
        saved_tensors=sum(e.stats.saved for e in measurement.encoders),
        by_kind=by_kind,
    )
