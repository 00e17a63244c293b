"""DP-SGD at the privacy unit: the baseline that protects what PMixED protects.

The paper's DP-SGD baseline (``pmixed.train.dpsgd``) protects one training *block*; PMixED
protects a whole unit (a speech, a sender). This baseline is user-level DP-SGD (DP-FedSGD,
McMahan et al. 2018, "Learning differentially private recurrent language models", Alg. 1 with
one local gradient): at each step

    S ~ Poisson(q) over the n_units training units,   q = units_per_step / n_units
    g_u = grad of the mean LM loss over up to k of unit u's blocks          (u in S)
    g_u <- g_u * min(1, C / (||g_u||_2 + 1e-6))                              (clip, ||g_u|| <= C)
    g   = (sum_{u in S} g_u + N(0, sigma^2 C^2 I)) / (q n_units)           (fixed denominator)

and AdamW steps on g. Adding or removing one unit changes the noiseless sum by at most C, so
each step is the Poisson-subsampled Gaussian mechanism with noise multiplier sigma, for which
Opacus' accountant (the same analysis as for its own DP-SGD) gives epsilon after ``steps``
steps; sigma is calibrated with ``opacus.accountants.utils.get_noise_multiplier`` for exactly
the steps taken. A unit with no full block counts in n_units and contributes nothing when drawn.
Adjacency: add/remove one unit (docs/privacy.md section 9). The noise comes from a seeded
``torch.Generator`` (like Opacus without ``secure_mode``): fine for a baseline, not for a release.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from pmixed.config import RunConfig
from pmixed.train.common import (
    baseline_inputs,
    baseline_lora,
    baseline_provenance,
    derive_seed,
    eval_probe,
    publish_folder,
    stage_adapter,
)

__all__ = ["UnitStep", "unit_blocks", "unit_dp_gradient", "noise_multiplier", "unit_epsilon",
           "train_dpsgd_unit"]


def unit_blocks(cfg: RunConfig, prepared, tokenizer) -> list[torch.Tensor]:
    """One ``[n_u, T]`` tensor per training unit (all parts; held-out units excluded), ordered by
    unit name; a unit whose texts fill no block gets a ``[0, T]`` tensor (it still counts)."""
    from pmixed.data.blocks import tokenize_blocks

    texts: dict[str, list[str]] = defaultdict(list)
    for part in prepared.partition.parts:
        for r in part:
            texts[r.unit].append(r.text)
    out = []
    for unit in sorted(texts):
        out.append(tokenize_blocks(texts[unit], tokenizer, cfg.data.block_size, drop_last=True))
    return out


@dataclass
class UnitStep:
    """What one step did: units drawn, their mean losses and gradient norms before clipping."""

    drawn: int
    losses: list[float]
    norms: list[float]


def unit_dp_gradient(model, params: list[torch.nn.Parameter], unit_batches: list[torch.Tensor], *,
                     max_grad_norm: float, noise_std: float, denominator: float,
                     generator: torch.Generator | None) -> UnitStep:
    """Set ``p.grad`` of every parameter in ``params`` to the noised, clipped unit average
    (module docstring): one backward per drawn unit (``unit_batches[i]``: ``[k_i, T]`` blocks of
    one unit), each unit's whole gradient clipped to ``max_grad_norm``, Gaussian noise of std
    ``noise_std`` (= sigma C) per coordinate, divided by ``denominator`` (= q n_units)."""
    from pmixed.models.lm import lm_loss

    summed = [torch.zeros_like(p) for p in params]
    losses, norms = [], []
    for batch in unit_batches:
        if batch.size(0) == 0:
            continue
        for p in params:
            p.grad = None
        loss = lm_loss(model, batch)
        loss.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        norm = float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads)))
        scale = min(1.0, max_grad_norm / (norm + 1e-6))
        for s, g in zip(summed, grads, strict=True):
            s.add_(g, alpha=scale)
        losses.append(float(loss.detach()))
        norms.append(norm)
    for s, p in zip(summed, params, strict=True):
        if noise_std > 0:
            # drawn by the (CPU) generator, then moved to the parameter's device
            s.add_(torch.normal(0.0, noise_std, size=s.shape, generator=generator, dtype=s.dtype).to(s.device))
        s.div_(denominator)
        p.grad = s
    return UnitStep(drawn=len(unit_batches), losses=losses, norms=norms)


def noise_multiplier(cfg: RunConfig, sample_rate: float) -> float:
    """sigma reaching ``[dpsgd_unit] epsilon`` at ``delta`` after ``steps`` Poisson-subsampled
    Gaussian steps at ``sample_rate`` (Opacus' calibration; its accountant's epsilon <= target)."""
    from opacus.accountants.utils import get_noise_multiplier

    d = cfg.dpsgd_unit
    return float(get_noise_multiplier(target_epsilon=d.epsilon, target_delta=d.delta,
                                      sample_rate=sample_rate, steps=d.steps, accountant=d.accountant))


def unit_epsilon(sigma: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """epsilon(delta) of ``steps`` subsampled Gaussian steps, from Opacus' accountant."""
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(sigma, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def train_dpsgd_unit(cfg: RunConfig, *, progress: bool = True, cache_dir=None) -> dict[str, Any]:
    """Train the unit-level DP-SGD baseline into ``<output_dir>/dpsgd_unit/``; returns its record."""
    from tqdm.auto import tqdm

    from pmixed.errors import ConfigError

    t0 = time.perf_counter()
    d = cfg.dpsgd_unit
    base, prepared, partition_entry = baseline_inputs(cfg, progress=progress, cache_dir=cache_dir)
    out_root = cfg.output_dir
    units = unit_blocks(cfg, prepared, base.tokenizer)
    n_units = len(units)
    if d.units_per_step > n_units:
        raise ConfigError("dpsgd_unit.units_per_step",
                          f"must be <= the number of training units ({n_units}), got {d.units_per_step:g}")
    q = d.units_per_step / n_units
    sigma = noise_multiplier(cfg, q)

    from pmixed.models.lm import perplexity

    probe = eval_probe(cfg, prepared, base.tokenizer)
    ppl = {"eval_ppl_before": perplexity(base.model, probe)} if probe.size(0) else {}

    seed = derive_seed(cfg.run.seed, "dpsgd_unit")
    gen = torch.Generator().manual_seed(seed)
    model, params, optimizer = baseline_lora(cfg, base.model, seed, lr=d.lr, weight_decay=d.weight_decay)
    losses, drawn, clipped = [], [], 0
    bar = tqdm(total=d.steps, desc="dp-sgd per unit", disable=not progress, leave=False)
    try:
        for _ in range(d.steps):
            pick = torch.nonzero(torch.rand(n_units, generator=gen) < q).flatten().tolist()
            batches = []
            for u in pick:
                blocks = units[u]
                take = torch.randperm(blocks.size(0), generator=gen)[: d.blocks_per_unit]
                batches.append(blocks[take])
            step = unit_dp_gradient(model, params, batches, max_grad_norm=d.max_grad_norm,
                                    noise_std=sigma * d.max_grad_norm, denominator=q * n_units,
                                    generator=gen)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.extend(step.losses)
            drawn.append(step.drawn)
            clipped += sum(n > d.max_grad_norm for n in step.norms)
            bar.update(1)
            if step.losses:
                bar.set_postfix(loss=f"{sum(step.losses) / len(step.losses):.3f}", units=step.drawn)
    except BaseException:
        model.unload()
        raise
    finally:
        bar.close()
    epsilon = unit_epsilon(sigma, q, d.steps, d.delta, d.accountant)
    if probe.size(0):
        ppl["eval_ppl_after"] = perplexity(model, probe)

    out = out_root / "dpsgd_unit"
    tmp = stage_adapter(model, cfg, "dpsgd_unit")
    tail = losses[-20:]
    record = {
        "kind": "dpsgd_unit",
        "privacy_unit": f"{cfg.data.unit or 'unit'} (user-level DP-SGD: one clipped gradient per unit per step)",
        "adjacency": "add/remove one unit",
        "epsilon": epsilon,
        "target_epsilon": d.epsilon,
        "delta": d.delta,
        "noise_multiplier": sigma,
        "max_grad_norm": d.max_grad_norm,
        "n_units": n_units,
        "n_units_without_blocks": sum(int(u.size(0) == 0) for u in units),
        "sample_rate": q,
        "expected_units_per_step": d.units_per_step,
        "units_drawn_per_step": drawn,
        "clipped_fraction": clipped / max(1, sum(drawn)),
        "steps": d.steps,
        "block_size": cfg.data.block_size,
        "first_train_loss": losses[0] if losses else None,
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        **ppl,
        **baseline_provenance(cfg, base, partition_entry, "dpsgd_unit", seed, tmp, t0),
    }
    publish_folder(tmp, out, "dpsgd_unit.json", record)
    model.unload()
    return record
