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
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import torch

# A model passed to an in-place conversion (fuse_wgrad, convert_batchnorm), which returns
# that same object: type checkers keep its own type.
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Weight dtypes whose gradients the fused layers accumulate into fp32 accumulators; a
layer with another weight dtype (float64, complex) runs as its torch counterpart."""


def routes(sink: Any, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """True when a fused layer whose sink is ``sink`` (None: none attached) routes the
    gradient of ``weight`` (and ``bias``) on this forward pass: gradients are wanted, the
    weight is fp32/bf16/fp16 (float64 and complex weights take plain autograd), and
    neither has a gradient hook of the user's (a routed gradient never reaches one)."""
    return (
        sink is not None
        and torch.is_grad_enabled()
        and weight.requires_grad
        and weight.dtype in FUSED_DTYPES
        and not has_user_grad_hooks(weight)
        and (bias is None or not has_user_grad_hooks(bias))
    )


def has_user_grad_hooks(t: torch.Tensor) -> bool:
    """True when ``t`` has a hook that must see its gradient: one from ``register_hook``,
    or a post-accumulate-grad hook other than the wrapper's own fold (which marks itself
    with ``fastaccum_fold``)."""
    if getattr(t, "_backward_hooks", None):
        return True
    post = getattr(t, "_post_accumulate_grad_hooks", None)
    if not post:
        return False
    return any(not getattr(hook, "fastaccum_fold", False) for hook in post.values())


# model -> the wrappers whose fused layers it holds, so that fuse_wgrad(model) run after
# wrapping attaches the new fused layers (both held weakly).
_SINKS: weakref.WeakKeyDictionary[torch.nn.Module, weakref.WeakSet[Any]] = (
    weakref.WeakKeyDictionary()
)


def register_sink(model: torch.nn.Module, sink: Any) -> None:
    """Record ``sink`` (a wrapper) as the gradient sink of ``model``'s fused layers."""
    _SINKS.setdefault(model, weakref.WeakSet()).add(sink)


def refresh_sinks(model: torch.nn.Module) -> None:
    """Hand the fused layers ``fuse_wgrad`` just made in ``model`` to the wrappers built
    on it (or on a DDP of it) before."""
    for key, sinks in list(_SINKS.items()):
        if key is model or getattr(key, "module", None) is model:
            for sink in list(sinks):
                sink._refresh_wgrad_sinks()


class SinkLink:
    """Mixin for fused layers: ``self._wgrad_sink`` reads and sets a weak reference."""

    weight: torch.Tensor  # the layer's (nn.Linear's, nn.Embedding's, Conv1D's)

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
        # nn.Module's (the class this mixes into): a copy of __dict__
        state = cast(dict[str, Any], super().__getstate__())  # type: ignore[misc]
        state.pop("_wgrad_sink_ref", None)
        state.pop("_wgrad_slot", None)
        return state


# torch.compile. A fused layer that routes its weight gradient runs eagerly, between two
# compiled graphs (a graph break): where its gradient goes (the accumulator under
# opt.backward, .grad under loss.backward()) is decided when backward runs, and a traced
# backward would fix that choice when the graph is traced, before any opt.backward, to
# always making the dW. The breaks are set up when a sink first attaches
# (prepare_for_compile), since torch.compiler.disable imports torch._dynamo, which
# `import fastaccum` must not.

_EAGER_REASON = (
    "fastaccum: a fused layer with an optimizer wrapper attached runs eagerly, between "
    "compiled graphs, because where its weight gradient goes is decided when backward "
    "runs; for fullgraph=True, wrap the optimizer without model= (the layers then run "
    "as their torch counterparts)"
)
_EAGER: list[tuple[Any, str]] = []  # (owner, attribute): functions to run eagerly
_FRAMES: list[Callable[..., Any]] = []  # functions dynamo never compiles as frames
_PREPARED = False


def run_eagerly(owner: Any, name: str) -> None:
    """Have ``owner.name`` (a function: the part of a fused layer that calls the fused
    op) run eagerly under ``torch.compile``, a graph break where compiled code calls it,
    once :func:`prepare_for_compile` has run. Outside compiled code the wrapper costs
    about 0.5 us a call."""
    _EAGER.append((owner, name))
    if _PREPARED:
        _disable(owner, name)


def skip_frames(*functions: Callable[..., Any]) -> None:
    """Keep ``torch.compile`` from compiling ``functions`` (a fused layer's forward and
    what it calls on the way to a :func:`run_eagerly` function) as frames of their own.
    Compiled code that calls such a layer breaks its graph and calls the layer as plain
    Python; without this, dynamo would compile these functions anew for every layer and
    input shape it meets, up to its recompile limit, to graphs that only lead to the same
    break. Graphs that call them still trace (inline) them as before."""
    _FRAMES.extend(functions)
    if _PREPARED:
        _skip(functions)


def prepare_for_compile() -> None:
    """Set up the graph breaks of fused layers (once; the optimizer wrapper calls it when
    it attaches to a model's fused layers)."""
    global _PREPARED
    if _PREPARED:
        return
    _PREPARED = True
    for owner, name in _EAGER:
        _disable(owner, name)
    _skip(_FRAMES)


def _disable(owner: Any, name: str) -> None:
    setattr(owner, name, torch.compiler.disable(getattr(owner, name), reason=_EAGER_REASON))


def _skip(functions: Sequence[Callable[..., Any]]) -> None:
    try:  # a torch without skip_code only recompiles more
        from torch._dynamo.eval_frame import skip_code
    except ImportError:
        return
    for fn in functions:
        skip_code(fn.__code__)
