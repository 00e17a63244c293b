"""The non-private baseline: one LoRA adapter fine-tuned on all parts together.

Same base, partition (held-out units excluded), LoRA shape and ``[train]`` settings as the
ensemble members (``[train] finetune_lr``, when set, replaces ``lr``: one model trained on all
the data for N x the member step cap wants a lower rate than a member's few steps); saved as a PEFT adapter folder ``<output_dir>/finetune/`` with
``finetune.json`` (losses, hashes, settings). Not private: it is the upper reference line.
"""

from __future__ import annotations

import time
from typing import Any

from pmixed.config import RunConfig
from pmixed.train.common import (
    baseline_inputs,
    baseline_provenance,
    derive_seed,
    eval_probe,
    fit_lora,
    publish_folder,
    stage_adapter,
)
from pmixed.train.fit import fit_record

__all__ = ["train_finetune"]


def train_finetune(cfg: RunConfig, *, progress: bool = True, cache_dir=None) -> dict[str, Any]:
    """Train the non-private LoRA baseline into ``<output_dir>/finetune/``; returns its record."""

    from pmixed.train.dpsgd import all_blocks

    t0 = time.perf_counter()
    base, prepared, partition_entry = baseline_inputs(cfg, progress=progress, cache_dir=cache_dir)
    out_root = cfg.output_dir
    blocks = all_blocks(cfg, prepared, base.tokenizer)

    from pmixed.models.lm import fixed_sample, perplexity

    seed = derive_seed(cfg.run.seed, "finetune")
    probe_train = fixed_sample(blocks, 64, seed=seed)
    probe_eval = eval_probe(cfg, prepared, base.tokenizer)
    ppl = {"train_sample_ppl_before": perplexity(base.model, probe_train)}
    if probe_eval.size(0):
        ppl["eval_ppl_before"] = perplexity(base.model, probe_eval)
    # the same number of passes over all the data as each member makes over its part
    t = cfg.train
    model, fit = fit_lora(cfg, base.model, blocks, seed=seed, desc="finetune", progress=progress,
                          max_steps=None if t.max_steps is None else t.max_steps * cfg.data.n_parts,
                          lr=t.finetune_lr)  # None: [train] lr
    try:
        ppl["train_sample_ppl_after"] = perplexity(model, probe_train)
        if probe_eval.size(0):
            ppl["eval_ppl_after"] = perplexity(model, probe_eval)
        out = out_root / "finetune"
        tmp = stage_adapter(model, cfg, "finetune")
        record = {
            "kind": "finetune",
            "private": False,
            **fit_record(fit, blocks),
            **ppl,
            "n_eval_blocks": int(probe_eval.size(0)),
            **baseline_provenance(cfg, base, partition_entry, "train", seed, tmp, t0),
        }
        publish_folder(tmp, out, "finetune.json", record)
        return record
    finally:
        model.unload()
