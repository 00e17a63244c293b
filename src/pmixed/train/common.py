"""Pieces shared by ensemble training and the baselines: base loading, partitioning, LoRA
configuration and a fresh adapter, the baselines' common setup and provenance, atomic JSON
writes, package versions, seeds. (Reading the records back: :mod:`pmixed.models.records`.)"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmixed.assets.registry import sha256_file
from pmixed.config import RunConfig
from pmixed.errors import DataError
from pmixed.models.builtins import BUILTIN_TINY_GPT2
from pmixed.models.peft_io import ADAPTER_WEIGHTS
from pmixed.models.records import read_json

__all__ = [
    "BaseInfo",
    "PreparedData",
    "load_base",
    "prepare_data",
    "make_lora_config",
    "new_lora",
    "baseline_lora",
    "sha256_file",
    "atomic_write_json",
    "read_json",
    "package_versions",
    "derive_seed",
    "ADAPTER_WEIGHTS",
]

@dataclass
class BaseInfo:
    """The shared base model, its tokenizer and their fingerprints."""

    model: Any
    tokenizer: Any
    name: str
    path: str
    weights_sha256: str
    tokenizer_sha256: str

    def manifest_entry(self, cfg: RunConfig) -> dict[str, Any]:
        entry = {
            "name": self.name,
            "path": self.path,
            "model_type": getattr(self.model.config, "model_type", None),
            "dtype": cfg.model.dtype,
            "n_params": int(sum(p.numel() for p in self.model.parameters())),
            "weights_sha256": self.weights_sha256,
        }
        if self.name == BUILTIN_TINY_GPT2:
            entry["public_pretrain"] = dataclasses.asdict(cfg.public_pretrain)
        return entry

    def tokenizer_entry(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {
            "name": getattr(tok, "name_or_path", None) or self.path,
            "class": type(tok).__name__,
            "vocab_size": len(tok),
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "sha256": self.tokenizer_sha256,
        }


def load_base(cfg: RunConfig, *, progress: bool = True, cache_dir=None) -> BaseInfo:
    """Resolve (building ``builtin:tiny-gpt2`` if needed) and load the base once, on ``[run] device``."""
    from pmixed.models.device import resolve_device
    from pmixed.models.loading import (
        load_causal_lm,
        resolve_model_path,
        tokenizer_sha256,
        weights_sha256,
    )

    device = resolve_device(cfg.run.device)  # before any work (tiny-gpt2 pre-training included)
    path = resolve_model_path(
        cfg.model.base, cache_dir=cache_dir, pretrain=cfg.public_pretrain, progress=progress
    )
    model, tokenizer = load_causal_lm(
        path,
        dtype=cfg.model.dtype,
        attn_implementation=cfg.model.attn_implementation,
        device=device,
        progress=progress,
    )
    for p in model.parameters():
        p.requires_grad_(False)
    return BaseInfo(
        model=model,
        tokenizer=tokenizer,
        name=cfg.model.base,
        path=path,
        weights_sha256=weights_sha256(model),
        tokenizer_sha256=tokenizer_sha256(tokenizer),
    )


@dataclass
class PreparedData:
    partition: Any  # pmixed.data.partition.Partition
    partition_sha256: str
    n_units: int


def prepare_data(cfg: RunConfig, *, cache_dir=None):
    """Load the private records and split them by privacy unit into ``n_parts`` parts."""
    from pmixed.data.partition import manifest_sha256, partition_by_unit
    from pmixed.data.sources import load_records

    d = cfg.data
    records = load_records(
        d.source,
        unit=d.unit,
        text_column=d.text_column,
        split=d.split,
        cache_dir=cache_dir,
        limit=d.limit,
    )
    if not records:
        raise DataError(f"no records loaded from {d.source!r}")
    partition = partition_by_unit(
        records, d.n_parts, seed=d.seed, eval_units=d.eval_units, unit_key=d.unit
    )
    if len(partition.parts) != d.n_parts:
        raise DataError(f"partition has {len(partition.parts)} parts, expected {d.n_parts}")
    return PreparedData(
        partition=partition,
        partition_sha256=manifest_sha256(partition.manifest),
        n_units=len({r.unit for r in records}),
    )


def write_partition_files(prepared: PreparedData, out_dir: Path) -> dict[str, Any]:
    """Write ``partition.json`` and ``eval_records.jsonl`` (held-out units) into ``out_dir``."""
    from pmixed.data.partition import write_manifest

    out_dir.mkdir(parents=True, exist_ok=True)
    sha = write_manifest(prepared.partition, out_dir / "partition.json")
    eval_path = out_dir / "eval_records.jsonl"
    tmp = eval_path.with_name(eval_path.name + f".tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in prepared.partition.eval_records:
            fh.write(
                json.dumps({"unit": r.unit, "doc_id": r.doc_id, "text": r.text}, ensure_ascii=False)
                + "\n"
            )
    os.replace(tmp, eval_path)
    return {
        "path": "partition.json",
        "sha256": sha,
        "n_parts": len(prepared.partition.parts),
        "eval_records": "eval_records.jsonl",
        "n_eval_records": len(prepared.partition.eval_records),
        "n_eval_units": len({r.unit for r in prepared.partition.eval_records}),
    }


def make_lora_config(cfg: RunConfig, model) -> Any:
    """PEFT ``LoraConfig`` from ``[lora]``; ``fan_in_fan_out`` set for GPT-2's Conv1D."""
    from peft import LoraConfig

    fan_in_fan_out = getattr(model.config, "model_type", "") == "gpt2"
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )


def eval_probe(cfg: RunConfig, prepared, tokenizer, n: int = 64):
    """Up to ``n`` fixed blocks of the held-out units' texts (``[n, T]``; may be empty): the
    baselines record their perplexity on them before and after training."""
    from pmixed.data.blocks import tokenize_blocks
    from pmixed.models.lm import fixed_sample

    texts = [r.text for r in prepared.partition.eval_records]
    return fixed_sample(tokenize_blocks(texts, tokenizer, cfg.data.block_size, drop_last=True), n)


def new_lora(cfg: RunConfig, base_model, seed: int):
    """``base_model`` wrapped in a fresh ``[lora]`` adapter (a PEFT model; the base is not copied),
    its LoRA init (A: kaiming-uniform, B: zeros) and dropout drawn after ``torch.manual_seed(seed)``."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(base_model, make_lora_config(cfg, base_model))


def baseline_lora(cfg: RunConfig, base_model, seed: int, *, lr: float, weight_decay: float):
    """The DP baselines' start: a fresh adapter (:func:`new_lora`) in train mode, its trainable
    parameters and an AdamW over them. Returns ``(model, params, optimizer)``."""
    import torch

    model = new_lora(cfg, base_model, seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def fit_lora(cfg: RunConfig, base_model, blocks, *, seed: int, max_steps: int | None,
             desc: str, progress: bool = True, lr: float | None = None):
    """Wrap ``base_model`` in a fresh LoRA adapter (initialised from ``seed``) and fit it on
    ``blocks`` with the ``[train]`` schedule (``lr`` overrides ``[train] lr``). Returns ``(peft_model, FitResult)``; the caller
    saves and then unloads the adapter (the base weights are never modified)."""
    from pmixed.train.fit import fit_causal_lm

    model = new_lora(cfg, base_model, seed)
    t = cfg.train
    try:
        fit = fit_causal_lm(
            model,
            blocks,
            epochs=t.epochs,
            lr=t.lr if lr is None else lr,
            batch_size=t.batch_size,
            weight_decay=t.weight_decay,
            max_steps=max_steps,
            warmup_steps=t.warmup_steps,
            grad_clip=t.grad_clip,
            seed=seed,
            progress=progress,
            desc=desc,
        )
    except BaseException:
        model.unload()  # leave the base untouched when training fails
        raise
    return model, fit


def baseline_inputs(cfg: RunConfig, *, progress: bool, cache_dir=None):
    """What every baseline starts from: ``(base, prepared, partition_entry)`` — the shared base,
    the private data split by unit, and the partition files written into ``output_dir``. The data
    are loaded and checked first, so bad data stop the run before any base pre-training."""
    set_threads()
    prepared = prepare_data(cfg, cache_dir=cache_dir)
    base = load_base(cfg, progress=progress, cache_dir=cache_dir)
    return base, prepared, write_partition_files(prepared, cfg.output_dir)


def stage_adapter(model, cfg: RunConfig, name: str) -> Path:
    """Save ``model``'s adapter into a fresh staging folder next to ``<output_dir>/<name>/`` (for
    :func:`publish_folder`) and return it."""
    import shutil

    tmp = cfg.output_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    return tmp


def baseline_provenance(cfg: RunConfig, base, partition_entry: dict[str, Any], section: str, seed: int,
                        adapter_dir: Path, t0: float) -> dict[str, Any]:
    """The fields every baseline record ends with: what it was trained from and with (checked by
    :func:`pmixed.models.records.baseline_mismatch`), the saved adapter's hash, the seconds since ``t0`` and versions."""
    settings = cfg.to_dict()
    return {
        "base_model": base.manifest_entry(cfg),
        "tokenizer_sha256": base.tokenizer_sha256,
        "partition": partition_entry,
        "lora": settings["lora"],
        section: settings[section],
        "seed": seed,
        "adapter_sha256": sha256_file(adapter_dir / ADAPTER_WEIGHTS),
        "seconds": round(time.perf_counter() - t0, 2),
        "versions": package_versions(),
    }


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def publish_folder(tmp: Path, out: Path, record_name: str, record: dict[str, Any]) -> None:
    """Write ``record`` into the staged folder ``tmp``, then move it into place as ``out`` (an
    interrupted run never leaves a half-written adapter where a finished one is expected)."""
    import shutil

    atomic_write_json(tmp / record_name, record)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("pmixed", "torch", "transformers", "peft", "opacus", "tokenizers", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from a run seed and labels (e.g. member index): stable across processes."""
    blob = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big") & 0x7FFFFFFF


def settings_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def set_threads(local_world_size: int = 1) -> None:
    """Share the CPU cores between the processes on this host."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return  # the user (or torchrun) decided
    n = max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    torch.set_num_threads(n)
