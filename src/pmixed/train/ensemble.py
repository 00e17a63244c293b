"""Phase I: one LoRA adapter per part of the private data, on one shared base.

Layout of an ensemble folder (``run.output_dir``)::

    ensemble.json              the manifest (see ``MANIFEST_FORMAT``), written atomically
    partition.json             the partition manifest (pmixed.data.partition.write_manifest)
    eval_records.jsonl         held-out units' records ({"unit", "doc_id", "text"} per line)
    members/member-000/        a PEFT adapter folder (adapter_config.json,
                               adapter_model.safetensors) plus member.json, its record
                               (with steps, max_steps and short: a member whose part is too
                               small for max_steps says so, and why, in short_reason)
    members/member-001/ ...

Each member folder is written under a temporary name and renamed into place only after the
adapter *and* its record are complete, so an existing folder whose adapter hash matches its
record (and the manifest entry, when there is one) is a finished member: reruns skip it.

Under ``torchrun --nproc_per_node=K`` (gloo for the few collectives; each rank computes on its
``[run] device``, with ``auto`` its own GPU when there are GPUs) rank ``r`` trains the members ``i`` with
``i % K == r``; each rank writes its members' records, and rank 0 assembles ``ensemble.json``
after a barrier. Every member's LoRA init, dropout and data order come from a seed derived from
``(run.seed, member index)``, so the result does not depend on which rank trained it.

The base weights are never modified: LoRA layers are injected for one member, trained, saved and
removed again (``unload()``, no merge); the base hash is checked again at the end.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pmixed.config import RunConfig
from pmixed.errors import DataError, EnsembleMismatch
from pmixed.models.records import MANIFEST_FORMAT, MANIFEST_VERSION
from pmixed.train.common import (
    ADAPTER_WEIGHTS,
    BaseInfo,
    atomic_write_json,
    derive_seed,
    fit_lora,
    load_base,
    package_versions,
    prepare_data,
    read_json,
    set_threads,
    settings_sha256,
    sha256_file,
    write_partition_files,
)
from pmixed.train.distributed import Dist, init_distributed
from pmixed.train.fit import fit_record

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "MEMBER_RECORD",
    "member_name",
    "short_line",
    "short_record",
    "EnsembleRunResult",
    "train_ensemble",
]

MEMBER_RECORD = "member.json"


def member_name(index: int) -> str:
    return f"member-{index:03d}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- training


@dataclass
class EnsembleRunResult:
    output_dir: Path
    manifest: dict[str, Any] | None  # None on ranks other than 0
    trained: list[int] = field(default_factory=list)  # members trained by this process
    skipped: list[int] = field(default_factory=list)  # members found finished
    seconds: float = 0.0


def _settings(cfg: RunConfig, base: BaseInfo, partition_sha: str) -> dict[str, Any]:
    """Everything a member's weights depend on; a finished member is reused only if it matches."""
    return {
        "base_weights_sha256": base.weights_sha256,
        "tokenizer_sha256": base.tokenizer_sha256,
        "partition_sha256": partition_sha,
        "block_size": cfg.data.block_size,
        "lora": dataclasses.asdict(cfg.lora) | {"target_modules": list(cfg.lora.target_modules)},
        # finetune_lr only shapes the fine-tune baseline, not a member
        "train": {k: v for k, v in dataclasses.asdict(cfg.train).items() if k != "finetune_lr"},
        "seed": cfg.run.seed,
    }


def _member_done(out: Path, index: int, settings_hash: str, manifest: dict | None) -> dict | None:
    """The member's record if its folder is complete and matches; else None."""
    folder = out / "members" / member_name(index)
    rec_path = folder / MEMBER_RECORD
    weights = folder / ADAPTER_WEIGHTS
    if not (rec_path.is_file() and weights.is_file()):
        return None
    try:
        rec = read_json(rec_path)
    except (OSError, ValueError):
        return None
    if rec.get("settings_sha256") != settings_hash:
        return None
    if sha256_file(weights) != rec.get("adapter_sha256"):
        return None
    if manifest is not None:
        entries = {m["index"]: m for m in manifest.get("members", [])}
        if index in entries and entries[index].get("adapter_sha256") != rec["adapter_sha256"]:
            return None
    return rec


def short_record(cfg: RunConfig, steps: int, n_blocks: int) -> dict[str, Any]:
    """``max_steps`` and whether the member got fewer optimiser steps than that (``short``), with
    the reason: its part is too small for ``max_steps`` at ``[train] epochs`` and ``batch_size``."""
    t = cfg.train
    rec: dict[str, Any] = {"max_steps": t.max_steps, "short": t.max_steps is not None and steps < t.max_steps}
    if rec["short"]:
        rec["short_reason"] = (
            f"its part has only {n_blocks} blocks of {cfg.data.block_size} tokens, and [train] epochs = "
            f"{t.epochs:g} at batch_size {t.batch_size} gives {steps} steps"
        )
    return rec


def short_line(rec: dict[str, Any]) -> str | None:
    """One line for a member record that got fewer steps than ``max_steps``; None otherwise."""
    if not rec.get("short"):
        return None
    return f"{rec['name']}: {rec['steps']} steps, fewer than max_steps = {rec['max_steps']}: {rec['short_reason']}"


def _train_member(
    cfg: RunConfig,
    base: BaseInfo,
    blocks,
    index: int,
    out: Path,
    *,
    settings_hash: str,
    part_info: dict[str, Any],
    dist_info: Dist,
    progress: bool,
) -> dict[str, Any]:
    seed = derive_seed(cfg.run.seed, "member", index)
    desc = f"{member_name(index)} (rank {dist_info.rank})" if dist_info.active else member_name(index)
    peft_model, fit = fit_lora(cfg, base.model, blocks, seed=seed, max_steps=cfg.train.max_steps,
                               desc=desc, progress=progress)
    try:
        members = out / "members"
        members.mkdir(parents=True, exist_ok=True)
        final = members / member_name(index)
        tmp = members / f".{member_name(index)}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        peft_model.save_pretrained(tmp)
        adapter_sha = sha256_file(tmp / ADAPTER_WEIGHTS)
        record = {
            "index": index,
            "name": member_name(index),
            "path": f"members/{member_name(index)}",
            "part_index": index,
            **part_info,
            **fit_record(fit, blocks),
            **short_record(cfg, fit.steps, int(blocks.size(0))),
            "seed": seed,
            "adapter_sha256": adapter_sha,
            "settings_sha256": settings_hash,
            "trained_by": {
                "rank": dist_info.rank,
                "world_size": dist_info.world_size,
                "host": socket.gethostname(),
                "pid": os.getpid(),
            },
            "finished_at": _now(),
            "versions": package_versions(),
        }
        atomic_write_json(tmp / MEMBER_RECORD, record)
        if final.exists():  # stale or mismatching earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        return record
    finally:
        peft_model.unload()  # remove the LoRA layers; base modules come back untouched
        if hasattr(base.model, "peft_config"):
            del base.model.peft_config


def _assemble_manifest(
    cfg: RunConfig,
    out: Path,
    base: BaseInfo,
    partition_entry: dict[str, Any],
    settings: dict[str, Any],
    settings_hash: str,
    previous: dict | None,
) -> dict[str, Any]:
    n = cfg.data.n_parts
    members = []
    for i in range(n):
        rec = _member_done(out, i, settings_hash, None)
        if rec is not None:
            members.append(rec)
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "created_at": (previous or {}).get("created_at", _now()),
        "updated_at": _now(),
        "complete": len(members) == n,
        "n_members": n,
        "base_model": base.manifest_entry(cfg),
        "tokenizer": base.tokenizer_entry(),
        "partition": partition_entry,
        "data": dataclasses.asdict(cfg.data),
        "lora": settings["lora"],
        "train": settings["train"],
        "seed": cfg.run.seed,
        "settings_sha256": settings_hash,
        "versions": package_versions(),
        "members": members,
    }


def _changed(section: str, old: Any, new: dict[str, Any]) -> list[str]:
    """``[section] field old -> new`` for every field of ``new`` that ``old`` (a manifest's copy)
    holds with another value."""
    if not isinstance(old, dict):
        return [f"[{section}] not recorded"]
    return [f"[{section}] {k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]


def _check_compatible(previous: dict, settings_hash: str, base: BaseInfo, partition_sha: str,
                      cfg: RunConfig, settings: dict[str, Any]):
    """Refuse to add to (or reuse members of) an ensemble trained with other settings, naming
    what differs: the base, the tokenizer, the partition (and the ``[data]`` fields that changed),
    or the ``[lora]``/``[train]`` fields and the run seed a member's weights depend on."""
    if previous.get("format") != MANIFEST_FORMAT:
        raise EnsembleMismatch(
            "ensemble.json in the output folder is not a pmixed ensemble manifest"
        )
    if previous.get("settings_sha256") == settings_hash:
        return
    reasons = []
    if previous.get("base_model", {}).get("weights_sha256") != base.weights_sha256:
        reasons.append("base model weights differ")
    if previous.get("tokenizer", {}).get("sha256") != base.tokenizer_sha256:
        reasons.append("tokenizer differs")
    if previous.get("partition", {}).get("sha256") != partition_sha:
        data = _changed("data", previous.get("data"), dataclasses.asdict(cfg.data))
        reasons.append("data partition differs" + (f" ({', '.join(data)})" if data else ""))
    else:  # the same partition: the blocks may still be cut otherwise
        reasons += _changed("data", previous.get("data"), {"block_size": settings["block_size"]})
    reasons += _changed("lora", previous.get("lora"), settings["lora"])
    reasons += _changed("train", previous.get("train"), settings["train"])
    if previous.get("seed") != settings["seed"]:
        reasons.append(f"[run] seed {previous.get('seed')!r} -> {settings['seed']!r}")
    reasons = reasons or ["LoRA/training settings or seed differ"]
    raise EnsembleMismatch(
        "the output folder holds an ensemble trained with other settings ("
        + "; ".join(reasons)
        + "): choose a new run.output_dir or delete the old one"
    )


def train_ensemble(
    cfg: RunConfig,
    *,
    progress: bool = True,
    cache_dir=None,
) -> EnsembleRunResult:
    """Train (or finish) the N-member ensemble described by ``cfg`` into ``cfg.output_dir``.

    Works as a single process or under ``torchrun`` (one call per rank). Returns what this
    process trained and skipped; rank 0 also returns the assembled manifest.
    """
    from tqdm.auto import tqdm

    from pmixed.models.device import resolve_device

    t0 = time.perf_counter()
    resolve_device(cfg.run.device)  # a GPU asked for where there is none: stop before any work
    dist_info = init_distributed()
    try:
        set_threads(dist_info.local_world_size)
        out = cfg.output_dir
        # 1. The data first: a unit column that does not exist, or too few units for the parts
        #    plus the evaluation units, must stop the run before minutes of base pre-training.
        #    The partition is deterministic, computed on every rank; rank 0 writes it (below).
        prepared = dist_info.run_collectively(lambda: prepare_data(cfg, cache_dir=cache_dir))
        # 2. The base: rank 0 builds/fetches it first (tiny-gpt2 pre-training), then all load it.
        if dist_info.active:
            from pmixed.models.loading import resolve_model_path

            dist_info.run_collectively(
                lambda: resolve_model_path(
                    cfg.model.base,
                    cache_dir=cache_dir,
                    pretrain=cfg.public_pretrain,
                    progress=progress,
                ),
                only_rank0=True,
            )
        base = dist_info.run_collectively(
            lambda: load_base(cfg, progress=progress, cache_dir=cache_dir)
        )
        settings = _settings(cfg, base, prepared.partition_sha256)
        settings_hash = settings_sha256(settings)
        manifest_path = out / "ensemble.json"

        def check_and_write() -> dict:
            previous = read_json(manifest_path) if manifest_path.is_file() else None
            if previous is not None:
                _check_compatible(previous, settings_hash, base, prepared.partition_sha256, cfg, settings)
            entry = write_partition_files(prepared, out)
            return {"previous": previous, "partition_entry": entry}

        # every rank reads the old manifest (read-only) so that all of them stop on a mismatch
        if dist_info.rank != 0 and manifest_path.is_file():
            _check_compatible(
                read_json(manifest_path), settings_hash, base, prepared.partition_sha256, cfg, settings
            )
        state = dist_info.run_collectively(check_and_write, only_rank0=True)
        previous = state["previous"] if state else None
        partition_entry = state["partition_entry"] if state else None

        # 3. Members of this rank.
        parts = prepared.partition.parts
        mine = [i for i in range(len(parts)) if i % dist_info.world_size == dist_info.rank]
        trained: list[int] = []
        skipped: list[int] = []

        def train_mine() -> None:
            from pmixed.data.blocks import tokenize_blocks

            bar = tqdm(
                mine,
                desc=f"members (rank {dist_info.rank})" if dist_info.active else "members",
                disable=not progress,
                position=0,
            )
            for i in bar:
                prev = previous if dist_info.rank == 0 else None
                if _member_done(out, i, settings_hash, prev) is not None:
                    skipped.append(i)
                    continue
                part = parts[i]
                texts = [r.text for r in part]
                # drop_last: the padded tail block would teach the member EOS runs
                blocks = tokenize_blocks(texts, base.tokenizer, cfg.data.block_size, drop_last=True)
                if blocks.ndim != 2 or blocks.size(0) == 0:
                    raise DataError(
                        f"part {i} yields no {cfg.data.block_size}-token block; "
                        "use fewer parts or a smaller data.block_size"
                    )
                part_info = {
                    "n_records": len(part),
                    "n_units": len({r.unit for r in part}),
                }
                record = _train_member(
                    cfg,
                    base,
                    blocks,
                    i,
                    out,
                    settings_hash=settings_hash,
                    part_info=part_info,
                    dist_info=dist_info,
                    progress=progress,
                )
                trained.append(i)
                if progress and (line := short_line(record)) is not None:
                    bar.write(f"short member: {line}", file=sys.stderr)
                if not dist_info.active:  # single process: keep the manifest current
                    atomic_write_json(
                        manifest_path,
                        _assemble_manifest(
                            cfg, out, base, partition_entry, settings, settings_hash, previous
                        ),
                    )

        dist_info.run_collectively(train_mine)

        # 4. The base must be exactly what we started from.
        from pmixed.models.loading import weights_sha256

        if weights_sha256(base.model) != base.weights_sha256:  # pragma: no cover - a bug guard
            raise RuntimeError("base weights changed during ensemble training")

        # 5. Rank 0 assembles the manifest from every member's record.
        manifest = None

        def assemble() -> dict:
            m = _assemble_manifest(
                cfg, out, base, partition_entry, settings, settings_hash, previous
            )
            atomic_write_json(manifest_path, m)
            return m

        manifest = dist_info.run_collectively(assemble, only_rank0=True)
        if manifest is not None and not manifest["complete"]:  # pragma: no cover
            have = {m["index"] for m in manifest["members"]}
            missing = [i for i in range(cfg.data.n_parts) if i not in have]
            raise RuntimeError(f"members {missing} missing after training")
        return EnsembleRunResult(
            output_dir=out,
            manifest=manifest,
            trained=trained,
            skipped=skipped,
            seconds=time.perf_counter() - t0,
        )
    finally:
        dist_info.close()
