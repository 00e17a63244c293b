"""The DP-SGD baseline: one LoRA adapter trained with Opacus on all private blocks together.

As in the paper, the privacy unit of this baseline is one training *block* (example-level DP),
which is weaker than PMixED's unit (a whole part, e.g. a user). The epsilon written to
``dpsgd/dpsgd.json`` is the one Opacus' accountant reports after training.

Noise is calibrated with Opacus' ``get_noise_multiplier`` for exactly the planned steps at the
sample rate Opacus' *accountant* charges, with Poisson sampling and per-sample clipping at
``max_grad_norm``. That rate is ``1 / len(DPDataLoader)``, and the DPDataLoader's length is
``int(1 / q)`` for the rate ``q = 1 / len(loader)`` it samples with, which float rounding can
make one short (``int(1 / (1 / 234)) == 233``): calibrating at ``q`` (as
``make_private_with_epsilon`` does) then ends above the target (8.0014 for a target of 8 at 25
steps). The accountant's rate is at least ``q``, so the charge stays an upper bound. A physical
batch smaller than the logical one goes through ``BatchMemoryManager``. Opacus runs without
``secure_mode`` (noise and sampling from torch's generators, not a CSPRNG): fine for a baseline
that is measured, not for a model that is released.

Hazard (Opacus issue 820): some Opacus + PEFT combinations silently corrupted LoRA updates; the
test suite checks that a zero-noise, no-clipping DP step equals a plain SGD step.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch

from pmixed.config import RunConfig
from pmixed.train.common import (
    baseline_inputs,
    baseline_lora,
    baseline_provenance,
    derive_seed,
    publish_folder,
    stage_adapter,
)

__all__ = ["dp_step", "all_blocks", "train_dpsgd"]


def all_blocks(cfg: RunConfig, prepared, tokenizer) -> torch.Tensor:
    """Blocks of every part, tokenised part by part (no block spans two parts): ``[n, T]``."""
    from pmixed.data.blocks import tokenize_blocks

    chunks = []
    for part in prepared.partition.parts:
        b = tokenize_blocks([r.text for r in part], tokenizer, cfg.data.block_size, drop_last=True)
        if b.numel():
            chunks.append(b)
    if not chunks:
        from pmixed.errors import DataError

        raise DataError("the private data yield no block of data.block_size tokens")
    return torch.cat(chunks, dim=0)


def dp_step(model, optimizer, batch: torch.Tensor) -> float | None:
    """Forward/backward/step on one (physical) batch under Opacus; returns the batch loss.

    An empty Poisson batch still takes an optimiser step (noise only), as the accountant
    assumes: its per-sample gradients are set to empty tensors instead of running the model.
    """
    from pmixed.models.lm import lm_loss

    optimizer.zero_grad(set_to_none=True)
    if batch.size(0) == 0:
        for p in optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        optimizer.step()
        return None
    loss = lm_loss(model, batch)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train_dpsgd(cfg: RunConfig, *, progress: bool = True, cache_dir=None) -> dict[str, Any]:
    """Train the DP-SGD baseline into ``<output_dir>/dpsgd/``; returns the written record."""
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier
    from opacus.utils.batch_memory_manager import BatchMemoryManager
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    d = cfg.dpsgd
    base, prepared, partition_entry = baseline_inputs(cfg, progress=progress, cache_dir=cache_dir)
    out_root = cfg.output_dir
    blocks = all_blocks(cfg, prepared, base.tokenizer)
    n = blocks.size(0)

    seed = derive_seed(cfg.run.seed, "dpsgd")
    model, _, optimizer = baseline_lora(cfg, base.model, seed, lr=d.lr, weight_decay=d.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(blocks), batch_size=min(d.batch_size, n), generator=gen)
    sample_rate = 1.0 / len(loader)
    steps_per_epoch = len(loader)
    planned = max(1, math.ceil(steps_per_epoch * d.epochs))
    if d.max_steps is not None:
        planned = min(planned, d.max_steps)
    with warnings.catch_warnings():  # no secure_mode: see the module docstring
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        engine = PrivacyEngine(accountant=d.accountant)
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,  # replaced below, before any step, once the rate is known
            max_grad_norm=d.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=d.grad_sample_mode,
        )
    # The rate make_private handed the accountant's step hook (opacus PrivacyEngine.make_private:
    # 1 / len(data_loader) of the DPDataLoader it returns); >= sample_rate, which Poisson draws with.
    accountant_rate = 1.0 / len(loader)
    sample_rate = float(getattr(loader, "sample_rate", sample_rate))  # what Poisson draws with
    if accountant_rate < sample_rate:  # would under-charge: refuse rather than report too little
        raise RuntimeError(f"Opacus' accountant would charge rate {accountant_rate} < the sampling "
                           f"rate {sample_rate}; this Opacus version is not supported")
    optimizer.noise_multiplier = float(get_noise_multiplier(
        target_epsilon=d.epsilon, target_delta=d.delta, sample_rate=accountant_rate,
        steps=planned, accountant=d.accountant))
    noise_multiplier = float(optimizer.noise_multiplier)

    steps, losses = 0, []
    bar = tqdm(total=planned, desc="dp-sgd", disable=not progress, leave=False)
    try:
        while steps < planned:
            with BatchMemoryManager(
                data_loader=loader,
                max_physical_batch_size=d.physical_batch_size,
                optimizer=optimizer,
            ) as mem_loader:
                for (batch,) in mem_loader:
                    loss = dp_step(model, optimizer, batch)
                    if loss is not None:
                        losses.append(loss)
                    if not optimizer._is_last_step_skipped:  # a logical step was taken
                        steps += 1
                        bar.update(1)
                        if losses:
                            bar.set_postfix(loss=f"{losses[-1]:.3f}")
                        if steps >= planned:
                            break
    finally:
        bar.close()
    epsilon = float(engine.get_epsilon(d.delta))
    # What the accountant charged, step by step: (noise multiplier, sample rate, steps) entries.
    history = [[float(h[0]), float(h[1]), int(h[2])] for h in getattr(engine.accountant, "history", [])]
    accounted = sum(h[2] for h in history)
    if epsilon > d.epsilon * (1 + 1e-9) or accounted != steps:
        warnings.warn(
            f"DP-SGD: Opacus' accountant reports epsilon {epsilon:.6g} for {accounted} accounted steps"
            f" (target {d.epsilon:g}, {steps} steps taken, {planned} planned); the table shows the"
            " reported epsilon, rounded up", stacklevel=2)

    # Save the adapter (unwrap Opacus' GradSampleModule first).
    peft_model = model._module if hasattr(model, "_module") else model
    out = out_root / "dpsgd"
    tmp = stage_adapter(peft_model, cfg, "dpsgd")
    tail = losses[-20:] or [float("nan")]
    record = {
        "kind": "dpsgd",
        "privacy_unit": "block (example-level DP-SGD, as in the paper)",
        "epsilon": epsilon,
        "target_epsilon": d.epsilon,
        "delta": d.delta,
        "noise_multiplier": noise_multiplier,
        "max_grad_norm": d.max_grad_norm,
        "sample_rate": sample_rate,
        "accountant_sample_rate": accountant_rate,
        "expected_batch_size": sample_rate * n,
        "physical_batch_size": d.physical_batch_size,
        "steps": steps,
        "planned_steps": planned,
        "epochs": steps / steps_per_epoch,
        "accountant": d.accountant,
        "accountant_history": history,
        "grad_sample_mode": d.grad_sample_mode,
        "n_blocks": int(n),
        "block_size": cfg.data.block_size,
        "first_train_loss": losses[0] if losses else None,
        "final_train_loss": sum(tail) / len(tail),
        **baseline_provenance(cfg, base, partition_entry, "dpsgd", seed, tmp, t0),
    }
    publish_folder(tmp, out, "dpsgd.json", record)
    peft_model.unload()
    return record
