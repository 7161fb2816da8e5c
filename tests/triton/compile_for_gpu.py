"""Compile every fastaccum Triton kernel for a CUDA GPU on a machine without one.

Run as a script (``python tests/triton/compile_for_gpu.py 90``), never under
``TRITON_INTERPRET``: it installs a Triton driver that reports an NVIDIA GPU of the given
compute capability, then calls the Triton ops on CPU tensors. Each launch goes through
Triton's whole code generation (TTIR, TTGIR, LLVM IR, PTX, and ptxas to a cubin) and then
launches nothing. What it checks is that the kernels build for that GPU with the installed
Triton, for the dtypes and options the package uses; their results are tested elsewhere
(tests/triton under the interpreter, tests/cuda on a GPU).

Prints one line per kernel with the number of variants compiled, and exits non-zero when a
kernel fails to build or was never reached.
"""

from __future__ import annotations

import os
import sys
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_for_gpu.py compiles for a GPU; run it without TRITON_INTERPRET=1")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver

H100_SHARED_BYTES = 232448  # the per-block shared memory an sm_90 GPU offers (227 KiB)


class _Utils:
    """The driver's binary loader: hands out no module, and the limits of the GPU."""

    def load_binary(self, name: str, kernel: bytes, shared: int, device: int) -> tuple:
        if not kernel:
            raise RuntimeError(f"{name}: ptxas produced an empty cubin")
        return None, None, 0, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device: int) -> dict[str, int]:
        return {"max_shared_mem": H100_SHARED_BYTES, "multiprocessor_count": 132}


class CompileOnlyDriver(DriverBase):
    """A Triton driver for an NVIDIA GPU that is not there: compiles, never launches."""

    def __init__(self, capability: int) -> None:
        super().__init__()
        self.target = GPUTarget("cuda", capability, 32)
        self.utils = _Utils()
        self.launches = 0

    @classmethod
    def is_active(cls) -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self) -> Any:
        def bench(kernel_call: Any, quantiles: Any = None, **kwargs: Any) -> Any:
            kernel_call()  # compiles the config (a config over the GPU's limits raises)
            return 1.0 if quantiles is None else [1.0] * len(quantiles)

        return bench

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_device_interface(self) -> Any:
        return torch.cpu

    def get_empty_cache_for_benchmark(self) -> torch.Tensor:
        return torch.empty(0)

    def clear_cache(self, cache: torch.Tensor) -> None:
        pass

    def launcher_cls(self, src: Any, metadata: Any) -> Any:
        def launch(*args: Any) -> None:
            self.launches += 1

        return launch


def _kernels() -> dict[str, Any]:
    """Every @triton.jit kernel of fastaccum.triton, by name (autotuned ones unwrapped)."""
    from triton.runtime.jit import JITFunction

    import fastaccum.triton.accumulate as acc
    import fastaccum.triton.batchnorm as bn
    import fastaccum.triton.optim_step as opt
    import fastaccum.triton.quantize as q
    import fastaccum.triton.wgrad as wg

    found = {}
    for module in (acc, bn, opt, q, wg):
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel"):
                found[f"{module.__name__.rsplit('.', 1)[-1]}.{name}"] = value
    return found


def _variants(kernel: Any) -> int:
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


def _exercise() -> None:
    """Call each Triton op with the dtypes and options the package launches it with."""
    from fastaccum.ops import batchnorm as bn
    from fastaccum.ops import optim_step as opt
    from fastaccum.ops import quantize as q
    from fastaccum.triton.accumulate import (
        accumulate_triton,
        finalize_triton,
        launch_accumulate,
        launch_finalize,
    )
    from fastaccum.triton.wgrad import wgrad_accumulate_triton

    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    sizes = (1, 1023, 65537)
    for grad_dtype in (torch.float32, torch.bfloat16, torch.float16):
        for accum_dtype in {torch.float32, grad_dtype}:
            accums = [rand(n, dtype=accum_dtype) for n in sizes]
            for zero in (False, True):
                grads = [rand(n, dtype=grad_dtype) for n in sizes]
                accumulate_triton(accums, grads, 0.5, zero_grads=zero)
            outs = [rand(n, dtype=grad_dtype) for n in sizes]
            finalize_triton(accums, outs, 0.25, None, False)
            finalize_triton(accums, outs, 0.25, torch.tensor(0.5), True)
            # One launch per tensor, as under torch.compile (traced tensors have no address).
            launch_accumulate(accums, grads, 0.5, False, pointer_tables=False)
            launch_finalize(accums, outs, 0.25, torch.tensor(0.5), True, pointer_tables=False)

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape, layout in (((4, 6, 5, 5), "contiguous"), ((4, 6, 5, 5), "channels_last")):
            x = rand(*shape, dtype=dtype)
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            stats = bn.batch_norm_stats(x, backend="triton")
            invstd = torch.rsqrt(stats.m2 / 100 + 1e-5)
            w, b = rand(6), rand(6)
            for relu in (False, True):
                y = bn.batch_norm_apply(x, stats.mean, invstd, w, b, relu, backend="triton")
                g = torch.ones_like(y)
                sums = bn.batch_norm_backward_reduce(
                    g, x, stats.mean, invstd, w, b, relu, backend="triton"
                )
                bn.batch_norm_backward_apply(
                    g, x, stats.mean, invstd, w, b, *sums, 100, relu, backend="triton"
                )

    params = [rand(n) for n in sizes]
    accums = [rand(n) for n in sizes]
    for factor_tensor in (None, torch.tensor(0.5)):
        bufs = [rand(n) for n in sizes]
        for first_step in (False, True):
            opt.sgd_window_step_(
                params, accums, bufs, 0.25, lr=0.1, momentum=0.9, nesterov=True,
                first_step=first_step, factor_tensor=factor_tensor, backend="triton",
            )  # fmt: skip
        opt.sgd_window_step_(params, accums, None, 0.25, lr=0.1, backend="triton")
        for decoupled, amsgrad in ((False, False), (True, False), (True, True)):
            m, v = [rand(n) for n in sizes], [rand(n).abs() for n in sizes]
            maxima = [rand(n).abs() for n in sizes] if amsgrad else None
            opt.adam_window_step_(
                params, accums, m, v, 0.25, step=3, lr=1e-3, weight_decay=0.1,
                decoupled_weight_decay=decoupled, factor_tensor=factor_tensor,
                max_exp_avg_sqs=maxima, backend="triton",
            )  # fmt: skip

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = rand(5000, dtype=dtype)
        for bits in (8, 4, 2):
            for stochastic in (False, True):
                packed = q.quantize_groups(x, bits, 256, seed=1, stochastic=stochastic,
                                           backend="triton")  # fmt: skip
            q.dequantize_groups(packed, bits, 256, x.numel(), dtype, backend="triton")

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        accum, bias = rand(96, 80), rand(96)
        grad_out, inp = rand(37, 96, dtype=dtype), rand(37, 80, dtype=dtype)
        wgrad_accumulate_triton(accum, grad_out, inp, 0.5, bias)
        wgrad_accumulate_triton(accum, grad_out.t().contiguous().t(), inp, 0.5, None)


def main(argv: list[str]) -> int:
    capability = int(argv[1]) if len(argv) > 1 else 90
    fake = CompileOnlyDriver(capability)
    driver.set_active(fake)

    from fastaccum import _backend

    _backend.triton_can_run = lambda device: True  # CPU tensors stand in for the GPU's
    import fastaccum.triton.batchnorm as tbn

    tbn._sm_count = lambda index: 132
    kernels = _kernels()
    _exercise()
    missing = []
    for name, kernel in sorted(kernels.items()):
        count = _variants(kernel)
        print(f"{name}: {count} variant(s) built for sm_{capability}")
        if count == 0:
            missing.append(name)
    print(f"triton {triton.__version__}, {fake.launches} launches skipped")
    if missing:
        print(f"never compiled: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
