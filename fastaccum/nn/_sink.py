"""The link from a fused layer to its gradient sink (the optimizer wrapper).

A model outlives its optimizers: one is dropped for another between training phases, or
after loading a checkpoint. So a layer holds its sink through a weak reference. Once the
wrapper is gone, the layer is a plain ``nn.Linear`` / ``nn.Embedding`` again, and the
wrapper's accumulators and optimizer state are freed with it. Copies and pickles of the
model (``copy.deepcopy``, ``torch.save(model)``) leave the link out: they would otherwise
carry the whole optimizer along.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Weight dtypes whose gradients the fused layers accumulate into fp32 accumulators; a
layer with another weight dtype (float64, complex) runs as its torch counterpart."""


class SinkLink:
    """Mixin for fused layers: ``self._wgrad_sink`` reads and sets a weak reference."""

    @property
    def _wgrad_sink(self) -> Any:
        ref = self.__dict__.get("_wgrad_sink_ref")
        return None if ref is None else ref()

    @_wgrad_sink.setter
    def _wgrad_sink(self, sink: Any) -> None:
        self.__dict__["_wgrad_sink_ref"] = None if sink is None else weakref.ref(sink)

    def _wgrad_pair(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (weight, bias) whose gradients this layer routes to its sink."""
        return self.weight, getattr(self, "bias", None)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # nn.Module's: a copy of __dict__
        state.pop("_wgrad_sink_ref", None)
        state.pop("_wgrad_slot", None)
        return state
