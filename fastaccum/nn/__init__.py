"""Modules: :class:`Linear` with fused weight-gradient accumulation, :func:`fuse_wgrad`."""

from fastaccum.nn.linear import Linear, WgradSink, fuse_wgrad

__all__ = ["Linear", "WgradSink", "fuse_wgrad"]
