"""Offloading saved tensors to host memory: a reusable pool of pinned buffers, copies on a
side stream, and prefetch ahead of backward.

Only CUDA tensors are offloaded. On the CPU the data already lives in host memory, so
:class:`ActivationPolicy(offload=True) <fastaccum.ActivationPolicy>` leaves CPU tensors where
they are (a no-op, not an error).

Stream discipline (per device):

- device -> host: the side stream waits for the current stream (the data is ready), copies
  into a pinned buffer, and the device tensor is marked as used by the side stream
  (``record_stream``) so that its memory is not handed out again before the copy ends;
- host -> device: the side stream waits for the current stream (the destination's memory
  may have been freed by work still queued there), copies, and records an event that the
  consumer's stream waits on;
- a host buffer goes back to the pool when its record is freed, tagged with the event of
  the last copy that reads it; the pool hands it out again only once that event is done.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import cast

import torch

_MIN_BUCKET = 1 << 16


def _bucket(nbytes: int) -> int:
    """Capacity for a request: rounded up to a quarter of its power of two (<= 25 % waste),
    so that buffers of nearby sizes are shared."""
    nbytes = max(int(nbytes), _MIN_BUCKET)
    step = 1 << max(nbytes.bit_length() - 3, 0)
    return -(-nbytes // step) * step


class PinnedPool:
    """Host buffers (pinned when CUDA is available) kept for reuse across steps.

    ``acquire(nbytes)`` returns a uint8 tensor of at least ``nbytes`` bytes; ``release``
    gives it back with the CUDA event (or None) after which it may be written again.
    Thread-safe: buffers come back from the autograd engine's threads.
    """

    def __init__(self, pin: bool | None = None) -> None:
        self.pin = torch.cuda.is_available() if pin is None else bool(pin)
        self._free: dict[int, list[tuple[torch.Tensor, torch.cuda.Event | None]]] = {}
        self._lock = threading.Lock()
        self.allocated_bytes = 0
        """Bytes of every buffer this pool has created (in use or idle)."""

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of ``_bucket(nbytes)`` bytes, reused when an idle one is ready."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        size = _bucket(nbytes)
        with self._lock:
            free = self._free.get(size, [])
            for i, (buf, event) in enumerate(free):
                if event is None or event.query():
                    del free[i]
                    return buf
            self.allocated_bytes += size
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)

    def release(self, buf: torch.Tensor, event: torch.cuda.Event | None = None) -> None:
        """Return ``buf``; it is reused only after ``event`` (a CUDA event) has completed."""
        with self._lock:
            self._free.setdefault(buf.numel(), []).append((buf, event))

    @property
    def idle_bytes(self) -> int:
        """Bytes held by buffers waiting in the pool."""
        with self._lock:
            return sum(size * len(bufs) for size, bufs in self._free.items())

    def clear(self) -> None:
        """Drop the idle buffers (in-use ones are unaffected)."""
        with self._lock:
            self.allocated_bytes -= sum(size * len(b) for size, b in self._free.items())
            self._free.clear()


_POOL: PinnedPool | None = None
_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_GLOBALS_LOCK = threading.Lock()


def default_pool() -> PinnedPool:
    """The process-wide pool the activation policies share."""
    global _POOL
    with _GLOBALS_LOCK:
        if _POOL is None:
            _POOL = PinnedPool()
        return _POOL


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    with _GLOBALS_LOCK:
        if device not in _STREAMS:
            _STREAMS[device] = torch.cuda.Stream(device)
        return _STREAMS[device]


class HostCopy:
    """Contiguous CUDA tensors copied to pooled pinned buffers; :meth:`fetch` brings them back.

    The device tensors are not kept. :meth:`prefetch` starts the copy back early;
    :meth:`fetch` waits for it on the current stream. The host copy lives as long as this
    object (a backward with ``retain_graph=True`` can fetch again); when it is freed, its
    buffers return to the pool.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], pool: PinnedPool) -> None:
        device = tensors[0].device
        self.device = device
        self._meta = [(t.shape, t.dtype) for t in tensors]
        self._prefetched: list[torch.Tensor] | None = None
        self._ready: torch.cuda.Event | None = None
        stream = _side_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        bufs = []
        with torch.cuda.stream(stream):
            for t in tensors:
                nbytes = t.numel() * t.element_size()
                buf = pool.acquire(nbytes)
                buf[:nbytes].copy_(t.reshape(-1).view(torch.uint8), non_blocking=True)
                t.record_stream(stream)
                bufs.append(buf)
        self._last_use = torch.cuda.Event()
        self._last_use.record(stream)
        self._bufs = bufs
        events = self._events = [self._last_use]
        weakref.finalize(self, _return_buffers, pool, bufs, events)

    def prefetch(self) -> None:
        """Start the host -> device copy on the side stream (no-op if already started)."""
        if self._prefetched is not None:
            return
        stream = _side_stream(self.device)
        current = torch.cuda.current_stream(self.device)
        out = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in self._meta]
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for buf, t in zip(self._bufs, out, strict=True):
                nbytes = t.numel() * t.element_size()
                t.reshape(-1).view(torch.uint8).copy_(buf[:nbytes], non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record(stream)
        self._events[0] = self._ready  # the buffers' last reader is now this copy
        self._prefetched = out

    def fetch(self) -> list[torch.Tensor]:
        """The tensors on their device, ready for use on the current stream."""
        self.prefetch()
        # prefetch() has set both: the copies and the event that marks them ready.
        tensors = cast("list[torch.Tensor]", self._prefetched)
        self._prefetched = None
        torch.cuda.current_stream(self.device).wait_event(cast("torch.cuda.Event", self._ready))
        return tensors

    @property
    def nbytes(self) -> int:
        """Host bytes held (bucket capacities)."""
        return sum(b.numel() for b in self._bufs)


def _return_buffers(
    pool: PinnedPool, bufs: list[torch.Tensor], events: list[torch.cuda.Event]
) -> None:
    for buf in bufs:
        pool.release(buf, events[0])
