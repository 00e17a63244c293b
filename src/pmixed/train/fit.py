"""The training loop: AdamW over fixed-length token blocks (``fit_causal_lm``).

Used to pre-train ``builtin:tiny-gpt2`` (:mod:`pmixed.train.public_pretrain`) and to fine-tune
the LoRA members and the baselines. Only parameters with ``requires_grad`` are optimised, so the
same loop serves full pre-training and LoRA fine-tuning.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pmixed.models.lm import lm_loss

__all__ = ["FitResult", "fit_causal_lm", "fit_record", "num_steps"]


def num_steps(n_blocks: int, batch_size: int, epochs: float, max_steps: int | None) -> int:
    """Optimiser steps for ``epochs`` passes (fractional allowed), capped by ``max_steps``."""
    per_epoch = max(1, math.ceil(n_blocks / batch_size))
    steps = max(1, math.ceil(per_epoch * epochs))
    return min(steps, max_steps) if max_steps is not None else steps


@dataclass
class FitResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # one per optimiser step
    final_loss: float = float("nan")  # mean loss of the last min(10, epoch) steps
    tokens: int = 0


def fit_causal_lm(
    model,
    blocks: torch.Tensor,
    *,
    epochs: float,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.0,
    max_steps: int | None = None,
    warmup_steps: int = 0,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    cosine: bool = False,
    progress: bool = True,
    desc: str = "train",
    position: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> FitResult:
    """AdamW over the trainable parameters on shuffled ``blocks`` (``[n, T]`` LongTensor).

    Shuffling uses a generator seeded with ``seed`` (never the global RNG). Learning rate: linear
    warm-up for ``warmup_steps``, then constant (or cosine decay to 10% with ``cosine=True``).
    """
    from tqdm.auto import tqdm

    if blocks.ndim != 2 or blocks.size(0) == 0:
        raise ValueError(
            f"blocks must be a non-empty [n, T] tensor, got shape {tuple(blocks.shape)}"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr)
    total = num_steps(blocks.size(0), batch_size, epochs, max_steps)

    def lr_at(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        if cosine:
            frac = (step - warmup_steps) / max(1, total - warmup_steps)
            return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        return lr

    gen = torch.Generator().manual_seed(seed)
    model.train()
    result = FitResult(steps=0, seconds=0.0)
    per_epoch = max(1, math.ceil(blocks.size(0) / batch_size))
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, position=position)
    order = torch.empty(0, dtype=torch.long)
    cursor = 0
    try:
        for step in range(total):
            if cursor >= order.numel():
                order = torch.randperm(blocks.size(0), generator=gen)
                cursor = 0
            idx = order[cursor : cursor + batch_size]
            cursor += batch_size
            batch = blocks[idx]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = lm_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{desc}: loss is {value} at step {step}")
            result.losses.append(value)
            result.tokens += int(batch.numel())
            if on_step is not None:
                on_step(step, value)
            bar.update(1)
            if step % 10 == 0 or step == total - 1:
                bar.set_postfix(loss=f"{value:.3f}")
    finally:
        bar.close()
    model.eval()
    result.steps = total
    result.seconds = time.perf_counter() - t0
    tail = result.losses[-min(len(result.losses), per_epoch, 10) :]
    result.final_loss = sum(tail) / len(tail)
    return result


def fit_record(fit: FitResult, blocks: torch.Tensor) -> dict:
    """The training part of an adapter's record (a member's ``member.json``, ``finetune.json``):
    the data it was fitted on and what the fit did."""
    return {
        "n_blocks": int(blocks.size(0)),
        "n_tokens": int(blocks.numel()),
        "steps": fit.steps,
        "tokens_seen": fit.tokens,
        "first_train_loss": fit.losses[0],
        "final_train_loss": fit.final_loss,
        "train_seconds": round(fit.seconds, 3),
    }
