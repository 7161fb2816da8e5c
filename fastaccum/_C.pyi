"""Type stub of the compiled extension ``fastaccum._C``.

Its ops are reached through ``torch.ops.fastaccum.*`` (typed wrappers in ``fastaccum.ops``);
the module itself exposes only build introspection.
"""

def cuda_built() -> bool:
    """True when the CUDA kernels were compiled into this build."""
