"""Parameter sets and the native PyTorch baseline that benchmarks compare against.

Shared by ``fastaccum bench``, the pytest-benchmark suites under ``benchmarks/`` and the
GPU scripts, so that every comparison uses the same shapes and the same native sequence.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterable
from typing import cast

import torch


def gpt_shapes(
    vocab: int, ctx: int, dim: int, layers: int, ff: int | None = None
) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style model with a tied LM head.

    Token and position embeddings, ``layers`` blocks (two LayerNorms, attention in/out
    projections, MLP up/down projections, all with biases), then the final LayerNorm.
    """
    ff = 4 * dim if ff is None else ff
    d = dim
    block = [
        (d,),
        (d,),
        (d, 3 * d),
        (3 * d,),
        (d, d),
        (d,),
        (d,),
        (d,),
        (d, ff),
        (ff,),
        (ff, d),
        (d,),
    ]
    return [(vocab, d), (ctx, d), *(block * layers), (d,), (d,)]


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small: 124,439,808 parameters in 148 tensors."""
    return gpt_shapes(vocab=50257, ctx=1024, dim=768, layers=12)


def tiny_shapes() -> list[tuple[int, ...]]:
    """A small GPT-like set (889,984 parameters in 40 tensors) for quick runs and CI."""
    return gpt_shapes(vocab=2048, ctx=256, dim=128, layers=3)


PARAM_SETS = {"gpt2-small": gpt2_small_shapes, "tiny": tiny_shapes}


def make_param_set(
    shapes: list[tuple[int, ...]],
    grad_dtype: torch.dtype,
    device: torch.device | str,
    *,
    accum_dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random gradients of ``grad_dtype`` and random ``accum_dtype`` accumulators, per shape.

    Random (never zero) data, so that no path is flattered by zeros.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    accums = [torch.randn(s, generator=gen, device=device).to(accum_dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen, device=device).to(grad_dtype) for s in shapes]
    return accums, grads


def native_accumulate(
    accums: list[torch.Tensor], grads: list[torch.Tensor], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a native training loop does per micro-step, the way users write it today.

    1. Each gradient is added into its fp32 accumulator, one ``add_`` per parameter (the
       ``.grad += dW`` of autograd, or a hand-written fp32 buffer for bf16 models).
    2. The global norm, as ``torch.nn.utils.clip_grad_norm_`` computes it (``_foreach_norm``,
       then the norm of the norms).
    3. The non-finite check (and in-place unscale, here by 1) that ``GradScaler`` runs.

    Returns (global norm, found-non-finite flag as a 1-element float tensor).
    """
    for a, g in zip(accums, grads, strict=True):
        a.add_(g, alpha=scale)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    device = grads[0].device
    found_inf = torch.zeros(1, device=device)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, torch.ones(1, device=device))
    return total, found_inf


def fused_accumulate(
    accums: list[torch.Tensor], grads: list[torch.Tensor], scale: float, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same job as :func:`native_accumulate` in one fused pass (returns norm and flag)."""
    from fastaccum.ops import accumulate_

    res = accumulate_(accums, grads, scale, backend=backend)
    return res.grad_sumsq.sqrt(), res.found_nonfinite


def bytes_moved(grads: list[torch.Tensor], accum_dtype: torch.dtype = torch.float32) -> int:
    """Fewest bytes one accumulate pass must move: read each gradient, read and write each
    accumulator."""
    accum_size = torch.empty((), dtype=accum_dtype).element_size()
    return sum(g.numel() * (g.element_size() + 2 * accum_size) for g in grads)


@functools.cache
def _pin_mmap_threshold() -> None:
    # glibc raises its mmap threshold after large frees, after which freed tensors stay in
    # the heap and the resident set no longer falls; pinning it keeps every tensor of
    # 128 KiB or more in its own mapping, returned to the OS when freed.
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 128 * 1024)


def peak_rss_bytes(fn: Callable[[], object]) -> int:
    """Extra resident memory (bytes) at the peak of ``fn()`` over what was resident before.

    Linux only: resets the process high-water mark (``/proc/self/clear_refs``) and reads
    ``VmHWM``. Used for CPU peaks because the CPU allocator keeps no statistics; large
    tensors are mmapped, so a freed tensor leaves the resident set at once.
    """

    _pin_mmap_threshold()

    def read(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not found in /proc/self/status")

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = read("VmRSS")
    fn()
    return read("VmHWM") - before


class GPT2Blocks(torch.nn.Module):
    """A stack of GPT-2-style transformer blocks with plain ``nn.Linear`` projections.

    Defaults are GPT-2 small's block shape (width 768, 12 heads, MLP 3072): per block
    c_attn 768x2304, c_proj 768x768, fc 768x3072, proj 3072x768 (7.1M parameters with
    LayerNorms and biases). ``forward(h)`` maps (batch, seq, width) hidden states to the
    same shape, with causal self-attention.
    """

    def __init__(self, blocks: int = 2, dim: int = 768, heads: int = 12, ff: int = 3072) -> None:
        super().__init__()
        self.heads = heads
        self.layers = torch.nn.ModuleList()
        for _ in range(blocks):
            self.layers.append(
                torch.nn.ModuleDict(
                    {
                        "ln_1": torch.nn.LayerNorm(dim),
                        "c_attn": torch.nn.Linear(dim, 3 * dim),
                        "c_proj": torch.nn.Linear(dim, dim),
                        "ln_2": torch.nn.LayerNorm(dim),
                        "fc": torch.nn.Linear(dim, ff),
                        "proj": torch.nn.Linear(ff, dim),
                    }
                )
            )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        for layer in cast(Iterable[torch.nn.ModuleDict], self.layers):
            q, k, v = layer["c_attn"](layer["ln_1"](h)).split(d, dim=-1)
            q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + layer["c_proj"](a.transpose(1, 2).reshape(b, t, d))
            h = h + layer["proj"](torch.nn.functional.gelu(layer["fc"](layer["ln_2"](h))))
        return h


def allocated_shapes(fn: Callable[[], object]) -> list[tuple[tuple[int, ...], int]]:
    """(shape, bytes) of every tensor that an op returns in new memory while ``fn()`` runs:
    not a view and not an in-place result of one of the op's inputs.

    Counts what the dispatcher allocates on the calling thread (CPU autograd runs there).
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    seen: list[tuple[tuple[int, ...], int]] = []

    class _Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            known = {
                t.untyped_storage().data_ptr()
                for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)
            }
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in known:
                    seen.append((tuple(t.shape), t.numel() * t.element_size()))
            return out

    with _Log():
        fn()
    return seen


class ByteGPT(torch.nn.Module):
    """A GPT-2-style language model over bytes: token and position embeddings,
    :class:`GPT2Blocks` (plain ``nn.Linear`` projections, so :func:`fastaccum.fuse_wgrad`
    reaches every one of them), a final LayerNorm and a head tied to the token embedding.

    ``forward(tokens)`` maps (batch, seq) int64 ids, ``seq <= ctx``, to (batch, seq, vocab)
    logits. Embeddings start at N(0, 0.02²) as in GPT-2, so the first loss is near ln(vocab).
    """

    def __init__(
        self, vocab: int = 256, dim: int = 128, heads: int = 4, layers: int = 2, ctx: int = 64
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.tok = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Embedding(ctx, dim)
        torch.nn.init.normal_(self.tok.weight, std=0.02)
        torch.nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = GPT2Blocks(blocks=layers, dim=dim, heads=heads, ff=4 * dim)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        if seq > self.ctx:
            raise ValueError(f"sequence length {seq} exceeds the model's context {self.ctx}")
        h = self.tok(tokens) + self.pos(torch.arange(seq, device=tokens.device))
        return self.norm(self.blocks(h)) @ self.tok.weight.t()


BYTE_GPT_SIZES: dict[str, dict[str, int]] = {
    # name -> ByteGPT(dim, heads, layers, ctx); vocabulary 256 (bytes)
    "tiny": {"dim": 128, "heads": 4, "layers": 2, "ctx": 64},  # 0.44M parameters
    "small": {"dim": 256, "heads": 8, "layers": 4, "ctx": 128},  # 3.3M
    "gpt2": {"dim": 768, "heads": 12, "layers": 12, "ctx": 1024},  # GPT-2 small's body, 86M
}
