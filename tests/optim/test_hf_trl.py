"""FastaccumTrainer mixed into TRL's SFTTrainer: ``class FastSFT(FastaccumTrainer, SFTTrainer)``.

SFTTrainer computes its own loss (over the completion tokens, divided by the window's
token count), so the reference is SFTTrainer itself: its own accumulation at the same
arguments, and its run at one batch of B·K. SFTConfig turns bf16 on by default, which on
the CPU runs the forward under bfloat16 autocast: the window gradient is then 2e-3
(relative) from the float64 one at any batch shape, and last-bit differences grow. The
bf16 run is compared with SFTTrainer's own accumulation; the float32 (bf16=False) and
float64 runs with the large batch, clipped.
"""

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from fastaccum.integrations import FastaccumTrainer
from tests.hf_helpers import (
    OPTIMS,
    B,
    K,
    Sequential,
    arguments,
    assert_same_training,
    dataset,
    tiny_gpt2,
)


class SequentialSFT(Sequential, SFTTrainer):
    pass


class FastSFT(Sequential, FastaccumTrainer, SFTTrainer):
    pass


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny model's 48 ids (SFTTrainer needs one; nothing
    is downloaded)."""
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(48)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="t0", eos_token="t0", unk_token="t0"
    )


def completions() -> Dataset:
    """The sequences of tests/hf_helpers.py, tokenized, with their labelled tokens as the
    completion (so micro-batches hold different numbers of loss tokens)."""
    rows = dataset()
    return Dataset.from_dict(
        {
            "input_ids": [r["input_ids"].tolist() for r in rows],
            "completion_mask": [(r["labels"] != -100).long().tolist() for r in rows],
        }
    )


def sft(cls, tmp_path, batch: int, accum: int, dtype=torch.float32, extra=None, **overrides):
    model = tiny_gpt2().to(dtype)
    config = arguments(
        tmp_path,
        batch,
        accum,
        config_class=SFTConfig,
        **OPTIMS["sgd"],
        completion_only_loss=True,
        max_length=None,
        **overrides,
    )
    trainer = cls(
        model=model,
        args=config,
        train_dataset=completions(),
        processing_class=tokenizer(),
        **(extra or {}),
    )
    trainer.train()
    return model, trainer


def test_sft_trainer_with_fastaccum_equals_its_own_accumulation(tmp_path):
    """Under SFTConfig's default bf16 autocast: parameters, logged grad norms and losses
    equal SFTTrainer's own accumulation (rel 1e-6; bit-identical here) over 2 epochs with
    short last windows. Clipping is off: the clip factors differ in their last bits
    (fastaccum's norm against torch's float32 one), and the bfloat16 forward turns
    last-bit parameter differences into 1e-4 after 6 steps; the tests below clip."""
    ref_model, ref = sft(SequentialSFT, tmp_path / "ref", B, K, max_grad_norm=0.0)
    model, ours = sft(FastSFT, tmp_path / "fa", B, K, max_grad_norm=0.0)
    assert_same_training(model, ours, ref_model, ref, rtol=1e-6)
    assert ours.fastaccum_optimizer.stats()["windows"] == 6


@pytest.mark.parametrize("fuse", [False, True], ids=["wrap", "fuse_wgrad"])
def test_sft_trainer_with_fastaccum_equals_the_large_batch_in_float64(tmp_path, fuse):
    """In float64, with and without fused weight gradients and with clipping at 0.8: the
    training of SFTTrainer at one batch of B·K (rel 1e-6: Trainer logs in float32)."""
    ref_model, ref = sft(SequentialSFT, tmp_path / "ref", B * K, 1, torch.float64)
    model, ours = sft(FastSFT, tmp_path / "fa", B, K, torch.float64, {"fuse_wgrad": fuse})
    assert_same_training(model, ours, ref_model, ref, rtol=1e-6)


def test_sft_trainer_with_fastaccum_equals_the_large_batch_in_float32(tmp_path):
    """In float32 without autocast (bf16=False), clipped at 0.8: SFTTrainer's training at
    one batch of B·K (rel 1e-5)."""
    ref_model, ref = sft(SequentialSFT, tmp_path / "ref", B * K, 1, bf16=False)
    model, ours = sft(FastSFT, tmp_path / "fa", B, K, bf16=False)
    assert_same_training(model, ours, ref_model, ref, rtol=1e-5)
