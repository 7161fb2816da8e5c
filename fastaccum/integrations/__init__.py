"""fastaccum inside other libraries' training loops.

- :class:`FastaccumTrainer` (needs ``transformers``): the Hugging Face ``Trainer`` with its
  gradient accumulation done by fastaccum.

Each integration imports its library only when it is first used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FastaccumTrainer"]


def __getattr__(name: str) -> Any:
    if name == "FastaccumTrainer":
        from fastaccum.integrations.hf_trainer import FastaccumTrainer

        return FastaccumTrainer
    raise AttributeError(f"module 'fastaccum.integrations' has no attribute {name!r}")
