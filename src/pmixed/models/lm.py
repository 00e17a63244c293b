"""Scoring a causal LM: next-token loss, perplexity and log-probabilities.

``per_sample_lm_loss``/``lm_loss`` (the training objective, also used by
:mod:`pmixed.train`), teacher-forced ``perplexity`` over fixed-length token blocks and
``log_probs``/``iter_log_probs``: the ``[B, T, V]`` log-softmax of a plain model or of a
:class:`~pmixed.models.stacked_lora.StackedLoRA` with one adapter per row.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pmixed.models.device import module_device
from pmixed.models.stacked_lora import StackedLoRA, StackedLoRALinear

__all__ = [
    "per_sample_lm_loss",
    "lm_loss",
    "perplexity",
    "fixed_sample",
    "log_probs",
    "iter_log_probs",
]


def per_sample_lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of each block: ``[B, T] -> [B]`` (float32, on the model's device)."""
    input_ids = input_ids.to(module_device(model))
    logits = model(input_ids=input_ids).logits  # [B, T, V]
    logits = logits[:, :-1, :].float()  # [B, T-1, V]
    targets = input_ids[:, 1:]  # [B, T-1]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    )
    return nll.view(targets.shape).mean(dim=1)  # [B]


def lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the per-block mean cross entropy (all blocks have equal length)."""
    return per_sample_lm_loss(model, input_ids).mean()


def fixed_sample(blocks: torch.Tensor, n: int, *, seed: int = 0) -> torch.Tensor:
    """Up to ``n`` blocks chosen by a seeded permutation (the same ones before and after)."""
    g = torch.Generator().manual_seed(seed)
    return blocks[torch.randperm(blocks.size(0), generator=g)[:n]]


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, *, batch_size: int = 16) -> float:
    """Teacher-forced perplexity over ``blocks`` (``[n, T]``), token-weighted."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, blocks.size(0), batch_size):
        batch = blocks[i : i + batch_size]
        loss = per_sample_lm_loss(model, batch)  # [b]
        total += float(loss.sum()) * (batch.size(1) - 1)
        count += batch.size(0) * (batch.size(1) - 1)
    model.train(was_training)
    return math.exp(total / max(count, 1))

def _call(model_or_stacked: nn.Module, input_ids: torch.Tensor, adapter_ids, **kwargs: Any):
    if isinstance(model_or_stacked, StackedLoRA):
        return model_or_stacked(input_ids, adapter_ids, **kwargs)
    if adapter_ids is not None and bool((torch.as_tensor(adapter_ids) >= 0).any()):
        owner = next(
            (m._owner for m in model_or_stacked.modules() if isinstance(m, StackedLoRALinear)),
            None,
        )
        if owner is None:
            raise ValueError("member rows requested but the model carries no stacked LoRA adapters")
        return owner(input_ids, adapter_ids, **kwargs)
    return model_or_stacked(input_ids=input_ids, **kwargs)


@torch.no_grad()
def log_probs(
    model_or_stacked: nn.Module,
    input_ids: torch.Tensor,
    adapter_ids: torch.Tensor | Sequence[int] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Next-token log-probabilities ``[B, T, V]`` (float32 log-softmax of the logits).

    ``adapter_ids [B]``: member per row, ``-1``/None for the public model. ``kwargs`` go to the
    model (``attention_mask``, ``past_key_values``, ``use_cache``, ``logits_to_keep``: with
    ``logits_to_keep=k`` only the last k positions are computed, ``[B, k, V]``).
    """
    kwargs.setdefault("use_cache", False)
    out = _call(model_or_stacked, input_ids, adapter_ids, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]  # [B, T, V]
    return torch.log_softmax(logits.float(), dim=-1)  # [B, T, V] float32


def iter_log_probs(
    model_or_stacked: nn.Module,
    input_ids: torch.Tensor,
    adapter_ids: torch.Tensor | Sequence[int] | None = None,
    *,
    chunk_rows: int = 4,
    **kwargs: Any,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Chunked :func:`log_probs`: yields ``(rows, logp)`` with ``logp = log_probs(...)[rows]``,
    ``[rows, T, V]``, one forward per chunk of ``chunk_rows`` rows, so neither activations nor
    ``[B, T, V]`` are ever held for the whole batch. Per-row tensor kwargs (e.g.
    ``attention_mask [B, T]``) are sliced with the rows; ``past_key_values`` is not supported.
    """
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
        raise ValueError("iter_log_probs does not take past_key_values (a cache cannot be chunked)")
    bsz = input_ids.shape[0]
    ids = None if adapter_ids is None else torch.as_tensor(adapter_ids, dtype=torch.long)
    for start in range(0, bsz, chunk_rows):
        rows = slice(start, min(start + chunk_rows, bsz))
        kw = {
            k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == bsz else v)
            for k, v in kwargs.items()
        }
        yield (
            rows,
            log_probs(model_or_stacked, input_ids[rows], None if ids is None else ids[rows], **kw),
        )
