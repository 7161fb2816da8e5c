"""Triton kernels, one module per op family; imported only when a Triton kernel is about to run."""
