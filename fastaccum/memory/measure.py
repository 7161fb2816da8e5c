"""Counting the bytes a forward pass keeps for backward."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fastaccum.memory.offload import HostCopy
from fastaccum.memory.policy import ActivationPolicy, Session


@dataclass(frozen=True)
class SavedBytes:
    """Bytes held for backward after one forward pass.

    ``total`` counts each storage once: the tensors autograd keeps, or what the policy
    stored in their place (codes, scales, masks), on the tensors' device. Parameters are
    not in ``total`` (the model holds them anyway) but in ``parameters``; offloaded data is
    in ``host`` (pinned host memory). ``by_kind`` splits ``total`` into ``kept``,
    ``quantize``, ``mask`` and ``relu`` (ReLU masks). ``per_sample`` is
    ``total / batch_size``.
    """

    total: int
    per_sample: float
    batch_size: int
    parameters: int
    host: int
    saved_tensors: int
    by_kind: dict[str, int] = field(default_factory=dict)


def _storage_bytes(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


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
        policy: measure under this policy; None measures plain PyTorch (everything kept).

    Returns:
        :class:`SavedBytes`. The graph is freed before returning; no gradient is computed.

    Raises:
        TypeError: when ``policy`` is not an :class:`~fastaccum.ActivationPolicy`.
        ValueError: when no tensor in ``example_batch`` has a batch dimension.
    """
    if policy is not None and not isinstance(policy, ActivationPolicy):
        raise TypeError(f"policy must be an ActivationPolicy or None, got {type(policy).__name__}")
    batch_size = _batch_size(example_batch)
    counting = policy if policy is not None else ActivationPolicy(bits=None, masks=False)
    session = Session(counting)
    session.encoder.track = []
    with torch.enable_grad(), session:
        if isinstance(example_batch, torch.Tensor):
            out = model(example_batch)
        elif isinstance(example_batch, Mapping):
            out = model(**example_batch)
        else:
            out = model(*example_batch)
    seen: set[int] = set()
    by_kind: dict[str, int] = {}
    parameters = host = 0
    for kind, data in session.encoder.track:
        if isinstance(data, HostCopy):
            host += data.nbytes
            continue
        tensors = [data] if isinstance(data, torch.Tensor) else list(data)
        for t in tensors:
            ptr, nbytes = _storage_bytes(t)
            if ptr in seen:
                continue
            seen.add(ptr)
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
        saved_tensors=session.stats.saved,
        by_kind=by_kind,
    )
