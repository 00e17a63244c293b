"""Shims over Hugging Face naming changes: the KV cache is ``past_key_values`` in older
transformers and ``cache`` in newer ones (>= 5.2x), both as a ``forward`` keyword and as a field
of the model output."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

__all__ = ["cache_kwarg_name", "output_cache"]


def cache_kwarg_name(model: nn.Module) -> str:
    """``"cache"`` for models whose forward takes it (transformers >= 5.2x), else ``"past_key_values"``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache of a model output, under its new (``cache``) or old (``past_key_values``) name."""
    fields = output.keys() if hasattr(output, "keys") else ()
    if "cache" in fields:
        return output["cache"]
    if "past_key_values" in fields:
        return output["past_key_values"]
    return None
