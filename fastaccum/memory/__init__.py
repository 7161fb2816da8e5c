"""Memory for the activations saved for backward: compress, offload, recompute, measure.

- :class:`ActivationPolicy` / :func:`save_activations`: one saved-tensor pipeline that
  keeps, quantizes, stores as 1-bit masks or offloads each saved tensor;
- :func:`checkpoint`: non-reentrant recomputation inside the same pipeline;
- :func:`saved_bytes`: the bytes a forward pass keeps for backward, with or without a policy;
- :func:`plan_batch`: the largest micro-batch that fits a memory budget, from real steps;
- :func:`peak_bytes`: peak tensor memory of a piece of work, on the CPU as on CUDA.
"""

from fastaccum.memory.checkpoint import checkpoint
from fastaccum.memory.measure import SavedBytes, saved_bytes
from fastaccum.memory.offload import PinnedPool
from fastaccum.memory.peak import peak_bytes
from fastaccum.memory.planner import BatchPlan, PlanningError, plan_batch
from fastaccum.memory.policy import ActivationPolicy, Session, SessionStats, save_activations

__all__ = [
    "ActivationPolicy",
    "BatchPlan",
    "PinnedPool",
    "PlanningError",
    "SavedBytes",
    "Session",
    "SessionStats",
    "checkpoint",
    "peak_bytes",
    "plan_batch",
    "save_activations",
    "saved_bytes",
]
