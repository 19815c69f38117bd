"""Integrations with training frameworks, imported on first use so that zokern does not depend on them.

``zokern.integrations.ZOTrainer``: the Hugging Face ``transformers.Trainer`` with zokern's ZO optimizers (needs
``transformers`` and ``accelerate``).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "ZOTrainer":
        try:
            from zokern.integrations.transformers import ZOTrainer
        except ImportError as e:
            raise ImportError(
                f"ZOTrainer needs transformers and accelerate ({e}); pip install transformers accelerate"
            ) from e
        return ZOTrainer
    raise AttributeError(f"module 'zokern.integrations' has no attribute {name!r}")
