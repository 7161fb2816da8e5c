"""Shared pieces of the Hugging Face Trainer tests (tests/optim/test_hf_trainer.py, and
tests/distributed/test_hf_trainer_ddp.py on two gloo ranks): a tiny GPT-2, sequences with
different numbers of labelled tokens, and Trainer classes that sample in dataset order."""

from __future__ import annotations

import math

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from fastaccum.integrations import FastaccumTrainer
from tests.helpers import assert_close_rel

B, K, N, T = 2, 4, 20, 12


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=48,
        n_positions=T,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def dataset(seed: int = 1, n: int = N) -> list[dict[str, torch.Tensor]]:
    """``n`` sequences of T tokens; each labels only its first 3..T tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 48, (n, T), generator=g)
    lengths = torch.randint(3, T + 1, (n,), generator=g)
    rows = []
    for i in range(n):
        labels = ids[i].clone()
        labels[lengths[i] :] = -100
        rows.append({"input_ids": ids[i], "labels": labels})
    return rows


class Sequential:
    """Trainer sampling in dataset order, so a window of K micro-batches of B holds the
    same sequences as one batch of B·K."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


class SequentialTrainer(Sequential, Trainer):
    pass


class SequentialFastaccumTrainer(Sequential, FastaccumTrainer):
    pass


def arguments(
    tmp_path, batch: int, accum: int, config_class=TrainingArguments, **overrides
) -> TrainingArguments:
    """The tests' TrainingArguments (or ``config_class``, a subclass such as TRL's
    SFTConfig): 2 epochs, cosine schedule with warm-up, weight decay, clipping at 0.8."""
    settings = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": accum,
        "num_train_epochs": 2,
        "learning_rate": 0.05,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 1,
        "weight_decay": 0.1,
        "max_grad_norm": 0.8,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    settings.update(overrides)
    return config_class(**settings)


def train(
    cls, tmp_path, batch: int, accum: int, model=None, trainer_kwargs=None, n: int = N, **overrides
):
    """Train ``model`` (a fresh tiny GPT-2 by default) with ``cls`` on ``n`` sequences of
    :func:`dataset`; returns (model, trainer)."""
    model = tiny_gpt2() if model is None else model
    trainer = cls(
        model=model,
        args=arguments(tmp_path, batch, accum, **overrides),
        train_dataset=dataset(n=n),
        **(trainer_kwargs or {}),
    )
    trainer.train()
    return model, trainer


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if "grad_norm" in entry]


def assert_same_training(
    model, trainer, ref_model, ref_trainer, rtol: float = 1e-5, steps: int = 6
) -> None:
    assert trainer.state.global_step == ref_trainer.state.global_step == steps
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert_close_rel(p, q, rtol)
    for key in ("grad_norm", "loss"):
        ours, theirs = logged(trainer, key), logged(ref_trainer, key)
        assert len(ours) == len(theirs) == steps
        for a, b in zip(ours, theirs, strict=True):
            assert math.isclose(a, b, rel_tol=rtol), (key, ours, theirs)


# SGD with momentum, and AdamW with an epsilon large enough that Adam's division does not
# magnify the last bit of a near-zero gradient (the native Trainer's own accumulation
# lands 4e-4 from the large batch at eps=1e-8 on this model).
OPTIMS = {
    "sgd": {"optim": "sgd", "optim_args": "momentum=0.9"},
    "adamw": {"optim": "adamw_torch", "adam_epsilon": 1e-3, "learning_rate": 0.01},
}


class MemoryLimit:
    """Raises torch's out-of-memory error from any forward over more than 2 sequences, as
    a GPU that fits only micro-batches of 2 would (the error accelerate's batch finder
    catches)."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        rows = inputs["input_ids"].shape[0]
        if rows > 2:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried a micro-batch of {rows}")
        return super().compute_loss(model, inputs, *args, **kwargs)
