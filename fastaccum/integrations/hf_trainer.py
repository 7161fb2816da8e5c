"""The Hugging Face ``transformers`` Trainer with fastaccum doing its gradient accumulation.

:class:`FastaccumTrainer` is a drop-in ``Trainer``: the same arguments, the same data
order, logging, evaluation, checkpoints and LR schedule, and the same update at every
optimizer step. What changes is how a window of ``args.gradient_accumulation_steps``
micro-batches becomes that update:

- each micro-batch's gradients are folded into fp32 accumulators as autograd produces them
  (``opt.backward``) and freed, so no ``.grad`` set stays alive across the window, and
  bf16 parameters accumulate in fp32 instead of in their own ``.grad``;
- the clip norm (``args.max_grad_norm``) comes out of the accumulation pass, and a window
  with a non-finite gradient is skipped with a warning instead of stepping NaNs;
- with ``fuse_wgrad=True`` the weight gradients of the model's Linear, Embedding and
  ``Conv1D`` layers are accumulated by their GEMMs, with no dW tensor made at all.

The micro-batch losses are Trainer's own (divided by the window's item count when the
model takes ``num_items_in_batch``, else by the number of micro-batches in the window), so
the window gradient is their sum, as in Trainer. Under DDP, Trainer scales each rank's
loss for DDP's average over ranks (by the number of processes when it divides by the
global item count); the wrapper averages over the micro-batches of every rank, which is
the same division.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, cast

import torch
from transformers import Trainer, TrainerCallback

import fastaccum
from fastaccum.optim.wrapper import AccumulatingOptimizer

__all__ = ["FastaccumTrainer"]

# FastaccumTrainer's options for fastaccum.wrap, at their defaults.
_WRAP_DEFAULTS = {
    "accum_dtype": torch.float32,
    "master_weights": False,
    "activations": None,
    "fused_update": None,
}

# Trainer methods this class overrides to hand clipping and the norm to the wrapper.
_TRAINER_HOOKS = (
    "log",
    "_clip_grad_norm",
    "_get_grad_norm",
    "_update_auto_batch_size",
    "training_step",
    "create_optimizer",
    "_load_optimizer_and_scheduler",
)


def _unaccelerated(optimizer: Any) -> Any:
    """The optimizer inside accelerate's AcceleratedOptimizer (a second ``train()`` finds
    Trainer's optimizer already prepared), else ``optimizer`` itself."""
    inner = getattr(optimizer, "optimizer", None)
    if type(optimizer).__name__ == "AcceleratedOptimizer" and inner is not None:
        return inner
    return optimizer


class _AfterOptimizerStep(TrainerCallback):
    """Runs the trainer's :meth:`FastaccumTrainer._report_skip` after each optimizer step
    (before Trainer decides whether to step the LR schedule)."""

    def __init__(self, trainer: FastaccumTrainer) -> None:
        self._trainer = weakref.ref(trainer)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self._trainer()
        if trainer is not None:
            trainer._report_skip()


class FastaccumTrainer(Trainer):
    """``transformers.Trainer`` whose gradient accumulation runs through fastaccum.

    Takes every ``Trainer`` argument, plus these keyword-only options:

    Args:
        fuse_wgrad: first swap the model's ``nn.Linear``, ``nn.Embedding`` and Hugging Face
            ``Conv1D`` layers for fastaccum's fused ones (:func:`fastaccum.fuse_wgrad`);
            same parameters, ``state_dict`` keys and outputs.
        accum_dtype, master_weights, activations, fused_update: as in
            :func:`fastaccum.wrap`. With the default ``fused_update``, Trainer's AdamW
            (``adamw_torch``, ``adamw_torch_fused``) and SGD update in fastaccum's fused
            kernel on the CPU.

    The optimizer Trainer builds (``args.optim``, its weight-decay groups) is wrapped with
    ``fastaccum.wrap(opt, args.gradient_accumulation_steps, model=model,
    max_grad_norm=args.max_grad_norm)``. An optimizer passed as ``optimizers=(opt, sched)``
    is wrapped the same way; one that is already fastaccum's (``fastaccum.wrap(...)`` or
    ``fastaccum.optim.AdamW(..., accum_steps=K)``) is used as it is, and must have
    ``accum_steps == args.gradient_accumulation_steps`` and the same ``max_grad_norm``.
    The wrapper is ``trainer.fastaccum_optimizer`` once training starts (its ``stats()``
    has the noise scale). ``grad_norm`` in the logs is the wrapper's window norm, NaN for a
    skipped window. Callbacks see no ``.grad``: the gradients live in the accumulators.

    ``fp16=True``: the wrapper takes accelerate's GradScaler (``scaler=``). Each
    micro-batch loss is scaled, the window is unscaled and checked once at its boundary,
    and a window with an inf/NaN is skipped with the scale lowered; Trainer then leaves
    the LR schedule where it was, as for a GradScaler skip.

    ``auto_find_batch_size=True``: each retry after an out-of-memory error raises K as the
    micro-batch shrinks, so that a step keeps its number of sequences (it updates
    ``args.gradient_accumulation_steps``).

    Several processes (``torchrun``, ``accelerate launch``): accelerate wraps the model in
    DDP after the optimizer is built, and the wrapper takes that DDP over at the first
    micro-batch (its sync, one all-reduce per DDP bucket per window from a communication
    hook, the counts summed over ranks), as ``fastaccum.wrap(opt, K, model=ddp)`` does.

    Raises:
        ValueError: several GPUs in one process
            (DataParallel), DeepSpeed, FSDP or a model sharded when loaded (use the
            explicit loop of the README's distributed section for FSDP2), options given
            with an optimizer that is already fastaccum's, or such an optimizer with
            another ``accum_steps`` or ``max_grad_norm`` (or, under fp16, without
            accelerate's GradScaler). Nothing of the model or optimizer is changed when it
            raises.
        NotImplementedError: the installed ``transformers`` lacks a Trainer method this
            class relies on.
    """

    def __init__(
        self,
        *args: Any,
        fuse_wgrad: bool = False,
        accum_dtype: torch.dtype = torch.float32,
        master_weights: bool = False,
        activations: Any = None,
        fused_update: bool | None = None,
        **kwargs: Any,
    ) -> None:
        for name, flag in (("fuse_wgrad", fuse_wgrad), ("master_weights", master_weights)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {type(flag).__name__}")
        missing = [name for name in _TRAINER_HOOKS if not hasattr(Trainer, name)]
        if missing:
            raise NotImplementedError(
                f"this transformers Trainer has no {missing}, which FastaccumTrainer "
                "overrides; it is tested with transformers 5.25"
            )
        super().__init__(*args, **kwargs)
        self._check_supported()
        handler = getattr(self.accelerator, "ddp_handler", None)
        if handler is not None and hasattr(handler, "gradient_as_bucket_view"):
            # The DDP accelerate makes then writes the window's last reduction into .grad
            # views of its buckets instead of allocating a gradient set for it (fastaccum's
            # window lives in its accumulators; DDP's buckets exist either way).
            handler.gradient_as_bucket_view = True
        self._wrap_options = {
            "accum_dtype": accum_dtype,
            "master_weights": master_weights,
            "activations": activations,
            "fused_update": fused_update,
        }
        given = _unaccelerated(self.optimizer)
        if isinstance(given, AccumulatingOptimizer):
            self._check_prebuilt(given)
        if fuse_wgrad:  # (fuse_wgrad raises a TypeError for a missing model)
            fastaccum.fuse_wgrad(cast(torch.nn.Module, self.model))
        self.fastaccum_optimizer: AccumulatingOptimizer | None = None
        self._norm_box = torch.full((), math.nan)
        self._norm_hook: Any = None
        self.add_callback(_AfterOptimizerStep(self))
        # Sequences per device and optimizer step: auto_find_batch_size keeps it (below).
        self._window_rows = self.args.train_batch_size * self.args.gradient_accumulation_steps
        self._first_micro_batch = self.args.train_batch_size

    def _check_supported(self) -> None:
        args = self.args
        if args.n_gpu > 1:
            raise ValueError(
                f"FastaccumTrainer runs one device per process (this process drives "
                f"n_gpu={args.n_gpu} GPUs through DataParallel); launch one process per GPU "
                "(torchrun --nproc_per_node N), which trains with DDP, or limit the run to "
                "one device (CUDA_VISIBLE_DEVICES=0)"
            )
        kind = getattr(self.accelerator.distributed_type, "value", "")
        if self.is_deepspeed_enabled:
            engine = "DeepSpeed"
        elif self.is_fsdp_enabled:
            engine = "FSDP (for FSDP2 use the explicit loop of the README's Distributed training)"
        elif getattr(self, "is_distributed_loading_by_transformers", False):
            engine = "a model sharded when loaded (tensor parallelism)"
        elif args.world_size > 1 and not kind.startswith("MULTI_"):
            engine = kind
        else:
            return
        raise ValueError(
            "FastaccumTrainer trains on one device, or with DDP across processes; this run "
            f"uses {engine}, which owns the gradient buffers fastaccum accumulates into"
        )

    def _max_grad_norm(self) -> float | None:
        """The window clip: ``args.max_grad_norm``, where Trainer's 0 means none."""
        return self.args.max_grad_norm if self.args.max_grad_norm > 0 else None

    def _check_prebuilt(self, opt: AccumulatingOptimizer) -> None:
        """Raise ValueError when an optimizer that is already fastaccum's disagrees with
        the Trainer arguments, or options were given that only apply when Trainer wraps."""
        k = self.args.gradient_accumulation_steps
        clip = self._max_grad_norm()
        if self._wrap_options != _WRAP_DEFAULTS:
            raise ValueError(
                "accum_dtype, master_weights, activations and fused_update apply when "
                "FastaccumTrainer "
                "wraps the optimizer; this one is already fastaccum's: give them to "
                "fastaccum.wrap instead"
            )
        scaler = self.accelerator.scaler
        if scaler is not None and opt.scaler is not scaler:
            raise ValueError(
                "fp16=True: the optimizer must unscale with accelerate's GradScaler; let "
                "FastaccumTrainer wrap a torch.optim optimizer, or build this one with "
                "scaler=trainer.accelerator.scaler"
            )
        if opt.accum_steps != k:
            raise ValueError(
                f"the optimizer accumulates accum_steps={opt.accum_steps} micro-batches but "
                f"TrainingArguments has gradient_accumulation_steps={k}; make them equal"
            )
        if opt.max_grad_norm != clip:
            raise ValueError(
                f"the optimizer clips at max_grad_norm={opt.max_grad_norm} but "
                f"TrainingArguments has max_grad_norm={self.args.max_grad_norm} (0 means "
                f"no clipping, max_grad_norm=None); make them agree (Trainer's default is "
                "1.0)"
            )

    # ------------------------------------------------------------------ optimizer

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Trainer's loading of a checkpoint's optimizer state, then the window of these
        arguments: a run saved with another ``gradient_accumulation_steps`` resumes with
        the new one, as Trainer's own does (its checkpoints are saved at a boundary, where
        K may change)."""
        with warnings.catch_warnings():
            # the wrapper restores the saved K and says so; here the arguments' K wins
            warnings.filterwarnings("ignore", "fastaccum: accum_steps is now", RuntimeWarning)
            super()._load_optimizer_and_scheduler(checkpoint)
        opt = _unaccelerated(self.optimizer)
        if isinstance(opt, AccumulatingOptimizer) and opt.micro_step == 0:
            opt.accum_steps = self.args.gradient_accumulation_steps

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer (``args.optim`` or the one passed in), wrapped by fastaccum.

        Returns:
            The :class:`~fastaccum.optim.AccumulatingOptimizer`, also stored as
            ``self.optimizer`` (until Trainer prepares it) and ``self.fastaccum_optimizer``.
        """
        current = _unaccelerated(self.optimizer)
        if isinstance(current, AccumulatingOptimizer):
            if current is not self.fastaccum_optimizer:  # not ours from an earlier train()
                self._check_prebuilt(current)
            self.optimizer = current
        else:
            self.optimizer = current
            inner = super().create_optimizer(model)
            self.optimizer = fastaccum.wrap(
                inner,
                self.args.gradient_accumulation_steps,
                model=self.model,
                max_grad_norm=self._max_grad_norm(),
                scaler=self.accelerator.scaler,
                **self._wrap_options,
            )
        opt = self.optimizer
        if opt.micro_step or opt._folded_in_this_micro_step():
            # Trainer zeroes the gradients when training starts; a window left partial by
            # a train() that raised (Ctrl-C, a failed batch) goes the same way.
            warnings.warn(
                f"fastaccum: discarding a partial window of {opt.micro_step} micro-batch(es) "
                "left by an earlier train() that stopped inside it; training starts on a "
                "clean window, as Trainer's zeroed gradients do",
                UserWarning,
                stacklevel=3,
            )
            opt._drop_window()
        opt.accum_steps = self.args.gradient_accumulation_steps  # changed by a retry
        if opt is not self.fastaccum_optimizer:
            if self._norm_hook is not None:
                self._norm_hook.remove()
            self._norm_hook = opt.register_step_post_hook(self._record_norm)
            # Trainer's loss is already divided for the window (by its item count or by
            # the number of micro-batches); the wrapper's hint that a loss looks divided
            # by accum_steps would be a false alarm here.
            opt._warned_divided = True
            self.fastaccum_optimizer = opt
        return opt

    def _update_auto_batch_size(self, batch_size: int) -> None:
        """``auto_find_batch_size``: each retry after an out-of-memory error gets a smaller
        micro-batch, and K grows so that an optimizer step still takes the same number of
        sequences (Trainer alone lets the effective batch shrink). The micro-batch is the
        largest divisor of that number no larger than accelerate's proposal.

        Raises:
            RuntimeError: no smaller micro-batch is left.
        """
        current = self._train_batch_size
        rows = self._window_rows
        # A retry: accelerate proposes a smaller batch; or, once an earlier retry took a
        # smaller micro-batch than accelerate's proposal (a divisor of the window), any
        # other size, since accelerate's own count then lags behind (8, then 4 for its 7,
        # then its 6): never a larger micro-batch with the window's K.
        shrunk = current < self._first_micro_batch
        if batch_size < current or (shrunk and batch_size != current):
            fits = [d for d in range(1, min(batch_size, current - 1) + 1) if rows % d == 0]
            if not fits:
                raise RuntimeError(
                    f"out of memory at a micro-batch of {current}, the smallest there is"
                )
            batch_size = fits[-1]
            warnings.warn(
                f"fastaccum: out of memory at a micro-batch of {current}; retrying with "
                f"{batch_size} x {rows // batch_size} micro-batches per optimizer step, "
                f"the same {rows} sequences per device",
                UserWarning,
                stacklevel=2,
            )
        if rows % batch_size == 0:  # a retry, or a resume from one (the checkpoint's size)
            self.args.gradient_accumulation_steps = rows // batch_size
        super()._update_auto_batch_size(batch_size)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's ``log``; training logs also get ``noise_scale``, the gradient noise
        scale of fastaccum's windows (B_simple, :mod:`fastaccum.stats`) in sequences over
        all processes, once it can be estimated: steps at a batch well below it use data
        efficiently, well above it they mostly cost compute."""
        opt = self.fastaccum_optimizer
        if opt is not None and "grad_norm" in logs:
            stats = opt.stats()
            if stats["noise_scale"] is not None and stats["noise_scale_units"] == "micro-batches":
                logs["noise_scale"] = stats["noise_scale"] * self._train_batch_size
        super().log(logs, start_time)

    def _record_norm(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # (a hook on the wrapper: it exists when this runs)
        norm = cast(AccumulatingOptimizer, self.fastaccum_optimizer).stats()["grad_norm"]
        self._norm_box.fill_(math.nan if norm is None else norm)

    # ------------------------------------------------------------------ the micro-batch

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Trainer's training step, with the backward folded into the accumulators.

        The last micro-batch of a window is left for Trainer's ``optimizer.step()``, which
        reaches the wrapper's ``step()`` and so closes the window (a short last window of
        an epoch included).

        Raises:
            RuntimeError: the wrapper's window no longer lines up with Trainer's (its
                ``accum_steps`` was changed by hand).
        """
        opt = self.fastaccum_optimizer
        if opt is None:
            raise RuntimeError(
                "FastaccumTrainer.training_step runs inside train(), which creates the "
                "fastaccum optimizer first"
            )
        last = self.accelerator.sync_gradients
        closes = opt.micro_step + 1 >= opt.accum_steps
        if closes and not last:
            raise RuntimeError(
                f"the fastaccum window (accum_steps={opt.accum_steps}) would close before "
                "Trainer's (gradient_accumulation_steps="
                f"{self.args.gradient_accumulation_steps}); do not change accum_steps "
                "inside FastaccumTrainer"
            )
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # accelerate wrapped the model in DDP after the optimizer was built: the
            # wrapper takes the sync and the window's reduction over from here on.
            opt._bind_ddp(model)
        scaler = opt.scaler
        prepared: Any = self.optimizer  # accelerate's AcceleratedOptimizer
        if scaler is not None and getattr(prepared, "scaler", None) is not None:
            # fp16: the wrapper unscales, checks and updates the scale once per window;
            # accelerate's optimizer would do it on .grad tensors the wrapper has folded.
            prepared.scaler = None
        # Trainer's losses sum to the window's; the wrapper averages over the window's
        # micro-batches, so each backward is seeded with their number.
        count = float(self.current_gradient_accumulation_steps)

        def backward(loss: torch.Tensor, **kwargs: Any) -> None:
            if kwargs:
                raise ValueError(
                    f"FastaccumTrainer cannot pass {sorted(kwargs)} to backward (LOMO-style "
                    "optimizers update inside backward; they cannot accumulate)"
                )
            if scaler is not None:
                loss = scaler.scale(loss)
            opt.backward(loss, gradient=torch.full_like(loss, count))

        accelerator = self.accelerator
        patched = accelerator.__dict__.get("backward")  # someone else's, kept for after
        accelerator.backward = backward  # this micro-batch's backward, this instance only
        try:
            # Sets DDP's gradient sync for this micro-batch, on only for the window's last
            # (the wrapper's step() set it for the next one, but Trainer's no_sync() then
            # restored the previous flag on exit), and closes a short last window on it.
            with opt.accumulate(last=last and not closes):
                loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            if patched is None:
                del accelerator.backward
            else:
                accelerator.backward = patched
        if not last:
            opt.step()
        return loss

    # ------------------------------------------------------------------ the boundary

    def _clip_grad_norm(self, model: torch.nn.Module) -> None:
        # The wrapper clips the window gradient at its boundary (max_grad_norm=).
        return None

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> torch.Tensor:
        # Called before Trainer's optimizer.step(), read (.item()) when the step is logged,
        # after it: the step post hook fills this box with the window's norm.
        self._norm_box = torch.full((), math.nan)
        return self._norm_box

    def _report_skip(self) -> None:
        """After Trainer's optimizer step under fp16: tell accelerate whether the wrapper
        skipped the window for an inf/NaN (as its GradScaler step would), so that Trainer
        leaves the LR schedule where it was, as it does for a GradScaler skip."""
        opt = self.fastaccum_optimizer
        if opt is None or opt.scaler is None or not hasattr(self.optimizer, "_is_overflow"):
            return
        # The norm box stays NaN unless the step post hook ran, i.e. the window stepped
        # (a stepped window's norm is finite).
        overflow = math.isnan(self._norm_box.item())
        self.optimizer._is_overflow = overflow  # type: ignore[union-attr]
