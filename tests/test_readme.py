"""The README's Python examples, run as written.

Every ```python block of README.md runs here on the CPU, unchanged except for lines of the
form ``name = ...`` (the reader's own object, which the test supplies). Each block gets a
scene: the names it leaves to the reader (a model, a loader, a loss) and a check of what it
did. Blocks that train are checked against plain torch on the large batch (or against
float64 torch for the BatchNorm kernels); the rest against what their comments promise.
A README block without a scene fails ``test_every_block_has_a_scene``, so a new example
cannot go untested.
"""

from __future__ import annotations

import collections
import functools
import math
import re
import textwrap
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

import fastaccum
from tests.helpers import (
    VOCAB,
    assert_close_rel,
    large_batch_windows,
    make_model,
    mean_loss,
    micro_step,
    split_windows,
    token_batches,
)

README = Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDER = re.compile(r"^\w+ = \.\.\.$")


def readme_blocks() -> list[tuple[int, str]]:
    """(line number of the first code line, dedented source) of each ```python block,
    including those indented under a list item."""
    blocks, lines, start = [], README.read_text().splitlines(), None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start = number + 1
        elif start is not None and line.strip() == "```":
            blocks.append((start, textwrap.dedent("\n".join(lines[start - 1 : number - 1]))))
            start = None
    return blocks


def key(source: str) -> str:
    """A block's first line that is not an import or a comment, without its trailing
    comment: the name of its scene."""
    for line in source.splitlines():
        text = line.strip()
        if text and not text.startswith(("import ", "from ", "#")):
            return text.split("  #")[0]
    raise AssertionError(f"a README block holds only imports:\n{source}")


BLOCKS = readme_blocks()
Check = Callable[[dict], None]
SCENES: dict[str, Callable[[Path, pytest.MonkeyPatch], tuple[dict, Check]]] = {}
FIXTURES: dict[str, tuple[str, ...]] = {}


def scene(first_statement: str, fixtures: tuple[str, ...] = ()):
    """Register the scene of the README block whose :func:`key` is ``first_statement``;
    ``fixtures`` are set up before the scene is built."""

    def register(build):
        SCENES[first_statement] = build
        FIXTURES[first_statement] = fixtures
        return build

    return register


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The examples' ``loss_fn``: the mean over every token of the micro-batch."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def same_length_batches(n_micro: int, n: int = 6, seed: int = 3) -> list[tuple]:
    """``n_micro`` micro-batches of ``n`` tokens each, as (tokens, targets)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, VOCAB, (n,), generator=gen), torch.randint(0, VOCAB, (n,), generator=gen))
        for _ in range(n_micro)
    ]


def with_counts(batches: list[tuple]) -> list[tuple]:
    """(tokens, targets, items) micro-batches, for loops written ``for x, y, n in loader``."""
    return [(x, y, y.numel()) for x, y in batches]


def hf_helpers() -> types.ModuleType:
    """tests.hf_helpers, or a skip when transformers is missing."""
    pytest.importorskip("transformers")
    from tests import hf_helpers

    return hf_helpers


def named_model() -> torch.nn.Module:
    """:func:`make_model` with named layers (``embed``, ``fc``, ``norm``, ``head``), for the
    examples that split parameters by name; same initial values."""
    layers = list(make_model())
    names = ["embed", "fc", "act", "norm", "head"]
    return torch.nn.Sequential(collections.OrderedDict(zip(names, layers, strict=True)))


def assert_trained_like(model: torch.nn.Module, start: list, reference: torch.nn.Module) -> None:
    """Each parameter's update from ``start`` equals the reference model's within rel 1e-3
    (the updates are about 1e-3 of the float32 parameters), plus 4 float32 ulps of the
    parameter: an update far below the parameter (a warmup's first steps) carries the
    parameter's own rounding, which the fused update and torch's step do in other
    orders."""
    params = list(model.parameters())
    ref_params = list(reference.parameters())
    assert len(params) == len(ref_params)
    ulp = torch.finfo(torch.float32).eps
    for p, p0, r in zip(params, start, ref_params, strict=True):
        assert not torch.equal(r, p0), "the reference did not train this parameter"
        update, want = (p.detach() - p0).double(), (r.detach() - p0).double()
        err = torch.linalg.vector_norm(update - want).item()
        bound = 1e-3 * torch.linalg.vector_norm(want).item()
        bound += 4 * ulp * torch.linalg.vector_norm(r.detach().double()).item()
        assert err <= bound, f"update off by {err:.3e} > {bound:.3e}"


def assert_like_adamw(model, start: list, batches: list, k: int = 8, clip=1.0, **adamw) -> None:
    """:func:`assert_trained_like` torch's AdamW(``**adamw``) on windows of ``k``
    micro-batches of ``batches``, each as one large batch, clipped at ``clip``."""
    ref = make_model()
    opt = torch.optim.AdamW(ref.parameters(), **adamw)
    large_batch_windows(ref, opt, split_windows(batches, k), max_grad_norm=clip)
    assert_trained_like(model, start, ref)


def snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_all_changed(model: torch.nn.Module, start: list) -> None:
    for p, p0 in zip(model.parameters(), start, strict=True):
        assert not torch.equal(p, p0), "a parameter did not train"


@scene("opt = fastaccum.wrap(")
def quick_start(tmp_path, monkeypatch):
    """Quick start: variable-length micro-batches, 3 windows of 8, 8 and a flushed 4."""
    model, batches = make_model(), token_batches(20)
    start = snapshot(model)

    def check(ns):
        assert_like_adamw(model, start, batches, lr=3e-4)
        assert ns["opt"].micro_step == 0

    return {"model": model, "loader": batches}, check


@scene("trainer = FastaccumTrainer(model=model, args=args, train_dataset=ds, fuse_wgrad=True)")
def quick_start_trainer(tmp_path, monkeypatch):
    """The Trainer one-liner: it builds a trainer that trains with fused layers."""
    hf = hf_helpers()
    model = hf.tiny_gpt2()
    args = hf.arguments(tmp_path, hf.B, hf.K, num_train_epochs=1)
    start = snapshot(model)

    def check(ns):
        trainer = ns["trainer"]
        trainer.train()
        windows = math.ceil(hf.N / hf.B / hf.K)
        assert trainer.state.global_step == windows
        assert trainer.fastaccum_optimizer.stats()["windows"] == windows
        fused = [m for m in model.modules() if type(m).__module__.startswith("fastaccum.nn")]
        assert fused, "fuse_wgrad=True left no layer fused"
        assert_all_changed(model, start)

    return {"model": model, "args": args, "ds": hf.dataset()}, check


@scene("model = ...")
def api_tour(tmp_path, monkeypatch):
    """The wrapper's loop with ``loss.backward()`` and a scheduler: 20 micro-batches of
    n = 6 tokens (windows of 8, 8 and a flushed 4)."""
    model, batches = make_model(), same_length_batches(20)
    start = snapshot(model)

    def check(ns):
        ref = make_model()
        opt = torch.optim.AdamW(ref.parameters(), lr=3e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
        large_batch_windows(ref, opt, split_windows(batches, 8), 1.0, sched)
        assert_trained_like(model, start, ref)
        assert ns["sched"].last_epoch == 2  # the flush does not step the scheduler

    return {"model": model, "loader": batches, "loss_fn": cross_entropy, "n": 6}, check


@scene('matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]')
def muon_and_adamw(tmp_path, monkeypatch):
    """Muon for the hidden matrices, AdamW for the rest: two windows of 8 afterwards."""
    model, batches = named_model(), token_batches(16)
    start = snapshot(model)

    def check(ns):
        opt, sched = ns["opt"], ns["sched"]
        for x, y in batches:
            if micro_step(model, opt, x, y, "backward"):
                sched.step()
        ref = named_model()
        params = dict(ref.named_parameters())
        matrices = [params[n] for n in ("fc.weight", "head.weight")]
        rest = [p for n, p in params.items() if n not in ("fc.weight", "head.weight")]
        opts = [torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=3e-4)]
        scheds = [
            torch.optim.lr_scheduler.LambdaLR(o, lambda step: min(1.0, (step + 1) / 100))
            for o in opts
        ]
        large_batch_windows(ref, opts, split_windows(batches, 8), 1.0, scheds)
        assert_trained_like(model, start, ref)

    return {"model": model}, check


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps its state process-wide (a Trainer sets it too): reset around."""
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(True)
    state.GradientState._reset_state()
    yield
    state.AcceleratorState._reset_state(True)
    state.GradientState._reset_state()


@scene('accelerator = Accelerator(mixed_precision="bf16")', ("fresh_accelerate_state",))
def accelerate_loop(tmp_path, monkeypatch):
    """accelerate with bf16 autocast on the CPU, 16 micro-batches of 6 tokens from a
    DataLoader (two windows). The reference is the native loop under the same autocast on
    the same micro-batches (``(loss / 8).backward()``, clip, step), so the forward passes
    round alike and only the order of the fp32 sums differs."""
    accelerate = pytest.importorskip("accelerate")
    model, batches = make_model(), same_length_batches(16)
    loader = torch.utils.data.DataLoader(with_counts(batches), batch_size=1)
    start = snapshot(model)

    def check(ns):
        assert ns["opt"].stats()["windows"] == 2
        ref = make_model()
        opt = torch.optim.AdamW(ref.parameters())
        for window in split_windows(batches, 8):
            for x, y in window:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = cross_entropy(ref(x[None]), y[None])
                (loss / len(window)).backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        assert_trained_like(model, start, ref)

    ns = {"Accelerator": accelerate.Accelerator, "model": model, "loader": loader}
    return {**ns, "loss_fn": cross_entropy}, check


@scene("args = TrainingArguments(")
def hf_trainer(tmp_path, monkeypatch):
    """The Trainer example as written (bf16, 16 micro-batches of 4 per step, 3 epochs, in
    ./out): 20 sequences make one short window per epoch."""
    hf = hf_helpers()
    monkeypatch.chdir(tmp_path)
    model = hf.tiny_gpt2()
    start = snapshot(model)

    def check(ns):
        trainer = ns["trainer"]
        assert trainer.state.global_step == 3
        assert trainer.fastaccum_optimizer.stats()["windows"] == 3
        assert_all_changed(model, start)
        assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)

    args_class = hf.TrainingArguments
    if not torch.cuda.is_available():  # bf16 on the CPU needs use_cpu=True
        args_class = functools.partial(args_class, use_cpu=True)
    ns = {"TrainingArguments": args_class, "model": model, "ds": hf.dataset()}
    return ns, check


@scene("class FastSFTTrainer(FastaccumTrainer, SFTTrainer):")
def trl_subclass(tmp_path, monkeypatch):
    """The TRL mix-in: in float32, clipped, it trains like SFTTrainer on the large batch."""
    pytest.importorskip("trl")
    from tests.optim import test_hf_trl as trl_tests

    hf = hf_helpers()

    def check(ns):
        class InOrder(hf.Sequential, ns["FastSFTTrainer"]):
            pass

        ref_model, ref = trl_tests.sft(
            trl_tests.SequentialSFT, tmp_path / "r", hf.B * hf.K, 1, bf16=False
        )
        model, ours = trl_tests.sft(InOrder, tmp_path / "f", hf.B, hf.K, bf16=False)
        hf.assert_same_training(model, ours, ref_model, ref, rtol=1e-5)

    return {"FastaccumTrainer": fastaccum.integrations.FastaccumTrainer}, check


@scene("opt = fastaccum.optim.AdamW(")
def fused_class(tmp_path, monkeypatch):
    """The fused AdamW class over two windows of 8 variable-length micro-batches."""
    model, batches = make_model(), token_batches(16)
    start = snapshot(model)

    def check(ns):
        opt = ns["opt"]
        for x, y in batches:
            micro_step(model, opt, x, y, "backward")
        assert_like_adamw(model, start, batches, lr=3e-4, weight_decay=0.1)

    return {"model": model}, check


@scene("model = fastaccum.fuse_wgrad(model)")
def fused_wgrad(tmp_path, monkeypatch):
    """fuse_wgrad's loop: two windows of 8 variable-length micro-batches."""
    model, batches = make_model(), token_batches(16)
    start = snapshot(model)

    def check(ns):
        assert isinstance(ns["model"][1], fastaccum.nn.Linear)
        assert_like_adamw(ns["model"], start, batches, clip=None)

    ns = {"model": model, "loader": with_counts(batches), "loss_fn": cross_entropy}
    return ns, check


def bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
    )


@scene('model = fastaccum.convert_batchnorm(model, mode="window")')
def batchnorm_window(tmp_path, monkeypatch):
    """One window of 16 micro-batches of 2 samples: the running statistics are those of
    ``nn.BatchNorm1d`` after one batch of 32."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(32, 4, generator=gen) * 3 + 2
    target = torch.randn(32, 1, generator=gen)

    def check(ns):
        model, opt = ns["model"], ns["opt"]
        assert isinstance(model[1], fastaccum.nn.AccumBatchNorm1d)
        for xb, tb in zip(x.split(2), target.split(2), strict=True):
            opt.backward(F.mse_loss(model(xb), tb))
            opt.step()
        assert opt.stats()["windows"] == 1
        # nn.BatchNorm1d in float64 on the window's hidden activations (the float32 Linear
        # as it was during the window, per micro-batch): an fp32 nn.BatchNorm1d is itself
        # off by more than 1e-6 on a channel whose mean is near 0.
        linear = bn_model()[0]
        with torch.no_grad():
            hidden = torch.cat([linear(xb) for xb in x.split(2)]).double()
        ref = torch.nn.BatchNorm1d(8).double()
        ref(hidden)
        torch.testing.assert_close(
            model[1].running_mean.double(), ref.running_mean, rtol=1e-6, atol=0
        )
        torch.testing.assert_close(
            model[1].running_var.double(), ref.running_var, rtol=1e-6, atol=0
        )

    return {"model": bn_model()}, check


@scene("mean, m2 = batch_norm_stats(x)")
def batchnorm_kernels(tmp_path, monkeypatch):
    """The kernels' statistics and eval output against float64 torch."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(6, 5, 7, generator=gen) * 2 + 100
    running_mean, running_var = torch.randn(5, generator=gen), torch.rand(5, generator=gen) + 0.5
    ns = {
        "x": x,
        "eps": 1e-5,
        "weight": torch.randn(5, generator=gen),
        "bias": torch.randn(5, generator=gen),
        "r": torch.rand(5, generator=gen) + 0.5,
        "d": torch.randn(5, generator=gen) * 0.1,
        "running_mean": running_mean,
        "running_var": running_var,
    }

    def check(ns):
        x64 = x.double()
        mean = x64.mean(dim=(0, 2))
        m2 = ((x64 - mean[:, None]) ** 2).sum(dim=(0, 2))
        assert_close_rel(ns["mean"], mean, 1e-6)
        assert_close_rel(ns["m2"], m2, 1e-5)
        assert_close_rel(ns["invstd"], torch.rsqrt(m2 / 42 + 1e-5), 1e-5)
        eval_out = F.batch_norm(
            x64,
            running_mean.double(),
            running_var.double(),
            ns["weight"].double(),
            ns["bias"].double(),
            training=False,
            eps=1e-5,
        )
        assert_close_rel(ns["y"], eval_out, 1e-6)

    return ns, check


class ScalarLossNet(torch.nn.Module):
    """A small MLP whose forward returns its scalar loss (``loss = model(x)``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).square().mean()


@scene("policy = fastaccum.ActivationPolicy(bits=8)")
def activation_memory(tmp_path, monkeypatch):
    """8-bit activations: gradients within 2% of exact ones, a checkpointed block's output
    equal to the plain forward, and the printed measurement naming a saving."""
    printed = []
    model, x = ScalarLossNet(), torch.randn(128, 64, generator=torch.Generator().manual_seed(8))
    block = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU())
    h = torch.randn(128, 64, requires_grad=True)

    def check(ns):
        exact = ScalarLossNet()
        exact(x).backward()
        grads = [
            (p.grad, e.grad) for p, e in zip(model.parameters(), exact.parameters(), strict=True)
        ]
        assert len(grads) == 4
        for grad, exact_grad in grads:
            assert_close_rel(grad, exact_grad, 0.02)
        assert not all(torch.equal(g, e) for g, e in grads), "8-bit saving left them exact"
        torch.testing.assert_close(ns["y"], block(h), rtol=0, atol=0)
        (measured,) = printed
        assert isinstance(measured, fastaccum.memory.SavedBytes)
        plain = fastaccum.memory.saved_bytes(model, x)
        assert 0 < measured.total < plain.total

    ns = {"model": model, "x": x, "block": block, "h": h, "example_batch": x}
    ns["print"] = lambda *values: printed.extend(values)
    return ns, check


@scene("plan = fastaccum.plan_batch(")
def plan_batch(tmp_path, monkeypatch):
    """Planning 512 samples, then the learning rate and the warm-up schedule."""
    torch.manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    gen = torch.Generator().manual_seed(10)

    def make_batch(n: int) -> tuple:
        return torch.randn(n, 16, generator=gen), torch.randint(0, 4, (n,), generator=gen)

    def check(ns):
        plan, opt, sched = ns["plan"], ns["opt"], ns["sched"]
        used = plan.micro_batch_size * (plan.accum_steps - 1) + plan.last_micro_batch_size
        assert used == 512
        assert opt.accum_steps == plan.accum_steps
        scaled = 3e-4 * math.sqrt(2)  # the square-root rule from batch 256 to 512
        assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
        for group in opt.optimizer.param_groups:  # the wrapped optimizer's own groups
            assert group["initial_lr"] == pytest.approx(scaled, rel=1e-12)
            assert group["lr"] == pytest.approx(scaled * 0.1, rel=1e-12)  # warm-up start

    ns = {
        "model": model,
        "make_batch": make_batch,
        "opt": torch.optim.AdamW(model.parameters(), lr=1e-3),
        "loss_fn": F.cross_entropy,
    }
    return ns, check


@scene("opt = fastaccum.wrap(torch.optim.AdamW(model.parameters(), lr=3e-4), 4, model=model)")
def growing_batch(tmp_path, monkeypatch):
    """The batch-size schedule: its doubling rule, replayed from the windows' noise scales."""
    model, batches = make_model(), same_length_batches(96)
    seen: list[tuple[float | None, int]] = []
    original_stats = fastaccum.AccumulatingOptimizer.stats

    def recording_stats(self):
        stats = original_stats(self)
        seen.append((stats["noise_scale"], self.accum_steps))
        return stats

    monkeypatch.setattr(fastaccum.AccumulatingOptimizer, "stats", recording_stats)

    def check(ns):
        assert seen, "no window was closed"
        k = 4
        for noise, accum in seen:
            assert accum == k
            if noise and noise > 2 * k * 6 and k < 64:
                k *= 2
        assert ns["opt"].accum_steps == k
        assert any(noise is not None for noise, _ in seen)

    ns = {"model": model, "loader": batches, "loss_fn": cross_entropy}
    return {**ns, "items_per_micro_batch": 6}, check


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank (for the DDP example)."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@scene("ddp = torch.nn.parallel.DistributedDataParallel(model)", ("one_rank_group",))
def ddp(tmp_path, monkeypatch):
    """The DDP loop on one rank: two windows of 8 micro-batches of 6 tokens."""
    model, batches = make_model(), same_length_batches(16)
    start = snapshot(model)

    def check(ns):
        assert_like_adamw(model, start, batches, lr=3e-4)

    return {"model": model, "loader": batches, "loss_fn": cross_entropy, "n": 6}, check


@scene("if opt.step():")
def distributed_checkpoint(tmp_path, monkeypatch):
    """torch.distributed.checkpoint in one process. The block saves at the boundary of the
    first window; its resume part then runs again on a fresh model and wrapper, and both
    train one more window bit-identically. (In one process ``dcp.load`` already writes
    into the fresh tensors; ``set_state_dict`` matters for sharded ones.)"""
    batches = token_batches(8)

    def build():
        model = make_model()
        return model, fastaccum.wrap(torch.optim.AdamW(model.parameters()), 4, model=model)

    def micro_steps(model, opt, window) -> None:
        for x, y in window:
            micro_step(model, opt, x, y, "backward")

    model, opt = build()
    micro_steps(model, opt, batches[:3])
    x, y = batches[3]
    opt.backward(mean_loss(model, x, y), num_items=y.numel())  # the block's step closes it
    ns = {"model": model, "opt": opt, "path": str(tmp_path / "ckpt")}

    def check(ns):
        assert opt.stats()["windows"] == 1 and (tmp_path / "ckpt").is_dir()
        resume_part = ns["__readme__"].split("# resuming, in a new process:")[1]
        resumed_model, resumed_opt = build()
        resumed = {**ns, "model": resumed_model, "opt": resumed_opt}
        exec(resume_part, resumed)
        micro_steps(model, opt, batches[4:])
        micro_steps(resumed_model, resumed_opt, batches[4:])
        for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
            assert torch.equal(p, q)
        assert not torch.equal(next(resumed_model.parameters()), next(make_model().parameters()))

    return {**ns, "dcp": dcp}, check


@scene("accums = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()]")
def ops(tmp_path, monkeypatch):
    """The ops by hand: one window of 8 variable-length micro-batches, clipped to 0.5, then
    an SGD step."""
    model, batches = make_model(), token_batches(8)
    start = snapshot(model)
    window = [types.SimpleNamespace(x=x, y=y, num_items=y.numel()) for x, y in batches]

    def check(ns):
        ref = make_model()
        large_batch_windows(ref, torch.optim.SGD(ref.parameters(), lr=0.1), [batches], 0.5)
        # The clip acts: SGD moved the parameters by lr x 0.5 in all (0.1 x a smaller norm
        # otherwise).
        steps = zip(ref.parameters(), start, strict=True)
        moved = torch.cat([(r.detach() - p0).flatten() for r, p0 in steps])
        assert torch.linalg.vector_norm(moved).item() == pytest.approx(0.05, rel=1e-4)
        assert_trained_like(model, start, ref)

    ns = {
        "model": model,
        "window": window,
        "loss_fn": cross_entropy,
        "total_items": sum(b.num_items for b in window),
        "max_norm": 0.5,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
    }
    return ns, check


def runnable(source: str) -> str:
    """The block with its ``name = ...`` placeholder lines blanked (line numbers kept)."""
    return "\n".join("" if PLACEHOLDER.match(line) else line for line in source.splitlines())


def test_every_block_has_a_scene():
    assert BLOCKS, f"no ```python block found in {README}"
    keys = [key(source) for _, source in BLOCKS]
    assert len(set(keys)) == len(keys), "two README blocks start with the same statement"
    assert set(keys) == set(SCENES), (
        f"README blocks without a scene: {sorted(set(keys) - set(SCENES))}; "
        f"scenes without a block: {sorted(set(SCENES) - set(keys))}"
    )


@pytest.mark.parametrize(("line", "source"), BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_block_runs_as_documented(line, source, tmp_path, monkeypatch, request):
    build = SCENES.get(key(source))
    if build is None:
        pytest.fail(f"README.md:{line} has no scene (see test_every_block_has_a_scene)")
    for fixture in FIXTURES[key(source)]:
        request.getfixturevalue(fixture)
    namespace, check = build(tmp_path, monkeypatch)
    namespace = {"torch": torch, "fastaccum": fastaccum, "__readme__": source, **namespace}
    code = compile("\n" * (line - 1) + runnable(source), str(README), "exec")
    exec(code, namespace)
    check(namespace)
