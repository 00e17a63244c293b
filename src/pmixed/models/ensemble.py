"""Loading a trained ensemble for inference: the base (= public model p_0), its tokenizer and the
member adapters, each verified against ``ensemble.json`` (weights, tokenizer and adapter hashes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmixed.assets.registry import sha256_file
from pmixed.errors import EnsembleMismatch
from pmixed.models.peft_io import ADAPTER_WEIGHTS
from pmixed.models.records import read_ensemble_manifest

__all__ = ["Ensemble", "eval_records_path", "load_ensemble", "read_eval_records"]


@dataclass
class Ensemble:
    """A verified ensemble: base model (= public model p_0), tokenizer, adapters, partition."""

    directory: Path
    manifest: dict[str, Any]
    base_model: Any
    tokenizer: Any
    member_names: list[str]
    adapter_paths: list[Path]
    partition_manifest: dict[str, Any]
    eval_records_path: Path | None

    @property
    def n_members(self) -> int:
        return len(self.adapter_paths)

    def eval_records(self) -> list[Any]:
        """The held-out units' records (never seen by any member)."""
        return read_eval_records(self.eval_records_path)

    def peft_model(self):
        """A ``PeftModel`` over the base with every member loaded as a named adapter.

        Adapter names are the member names (``member-000`` ...); use ``set_adapter`` or PEFT's
        mixed batches (``adapter_names=[...]``, ``"__base__"`` for p_0). Wraps the base in place.
        """
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            self.base_model, str(self.adapter_paths[0]), adapter_name=self.member_names[0]
        )
        for name, path in zip(self.member_names[1:], self.adapter_paths[1:], strict=True):
            model.load_adapter(str(path), adapter_name=name)
        model.eval()
        return model


def eval_records_path(directory: Path) -> Path:
    """Where a trained run's held-out records are (its ensemble.json names the file)."""
    part = read_ensemble_manifest(directory).get("partition", {})
    return directory / part.get("eval_records", "eval_records.jsonl")


def read_eval_records(path: Path | None) -> list[Any]:
    """The held-out records of an eval_records.jsonl (empty when there is none), no model loaded."""
    import json

    from pmixed.data.records import Record

    if path is None or not path.is_file():
        return []
    out = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                d = json.loads(line)
                out.append(Record(unit=d["unit"], text=d["text"], doc_id=d["doc_id"]))
    return out


def load_ensemble(
    directory: str | os.PathLike[str],
    base_model: Any = None,
    *,
    tokenizer: Any = None,
    device: str = "cpu",
    cache_dir=None,
    verify_adapters: bool = True,
    require_complete: bool = True,
    progress: bool = False,
) -> Ensemble:
    """Read and verify an ensemble folder.

    ``base_model`` may be ``None`` (load the base named in the manifest), a name/path, a loaded
    model, or a ``(model, tokenizer)`` pair. The base weights' sha256 must equal the manifest's;
    so must every adapter file's hash and the tokenizer's. Any mismatch raises
    :class:`EnsembleMismatch` naming what differs.
    """
    from pmixed.config import PublicPretrainConfig
    from pmixed.models.builtins import BUILTIN_TINY_GPT2
    from pmixed.models.loading import load_causal_lm, tokenizer_sha256, weights_sha256

    directory = Path(directory)
    manifest = read_ensemble_manifest(directory)
    base_entry = manifest["base_model"]
    if isinstance(base_model, tuple):
        base_model, tokenizer = base_model
    if base_model is None or isinstance(base_model, (str, os.PathLike)):
        name = str(base_model) if base_model is not None else base_entry["name"]
        pretrain = None
        if name == BUILTIN_TINY_GPT2 and "public_pretrain" in base_entry:
            pretrain = PublicPretrainConfig(**base_entry["public_pretrain"])
        model, loaded_tok = load_causal_lm(
            name,
            dtype=base_entry.get("dtype", "float32"),
            device=device,
            cache_dir=cache_dir,
            pretrain=pretrain,
            progress=progress,
        )
        tokenizer = tokenizer or loaded_tok
    else:
        model = base_model
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base_entry["path"])
    got = weights_sha256(model)
    if got != base_entry["weights_sha256"]:
        raise EnsembleMismatch(
            f"base model weights do not match the ensemble in {directory}: the adapters were "
            f"trained on {base_entry['name']!r} with weights sha256 "
            f"{base_entry['weights_sha256'][:16]}..., the given base has {got[:16]}..."
        )
    tok_sha = tokenizer_sha256(tokenizer)
    if tok_sha != manifest["tokenizer"]["sha256"]:
        raise EnsembleMismatch(
            f"tokenizer does not match the ensemble in {directory} "
            f"(sha256 {tok_sha[:16]}... vs {manifest['tokenizer']['sha256'][:16]}...)"
        )
    members = sorted(manifest["members"], key=lambda m: m["index"])
    if require_complete:
        have = {m["index"] for m in members}
        missing = [i for i in range(manifest["n_members"]) if i not in have]
        if missing or not manifest.get("complete", False):
            raise EnsembleMismatch(
                f"ensemble in {directory} is incomplete: members {missing} are missing; "
                "rerun `pmixed train ensemble` to finish it"
            )
    paths, names = [], []
    for m in members:
        folder = directory / m["path"]
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise EnsembleMismatch(f"{m['name']}: adapter file {weights} is missing")
        if verify_adapters and sha256_file(weights) != m["adapter_sha256"]:
            raise EnsembleMismatch(
                f"{m['name']}: adapter {weights} does not match its sha256 in ensemble.json "
                "(corrupt or replaced)"
            )
        paths.append(folder)
        names.append(m["name"])
    part = manifest.get("partition", {})
    part_path = directory / part.get("path", "partition.json")
    partition_manifest: dict[str, Any] = {}
    if part_path.is_file():
        from pmixed.data.partition import manifest_sha256, read_manifest

        partition_manifest = read_manifest(part_path)
        if part.get("sha256") and manifest_sha256(partition_manifest) != part["sha256"]:
            raise EnsembleMismatch(f"{part_path} does not match the sha256 in ensemble.json")
    eval_path = directory / part.get("eval_records", "eval_records.jsonl")
    model.to(device)
    model.eval()
    return Ensemble(
        directory=directory,
        manifest=manifest,
        base_model=model,
        tokenizer=tokenizer,
        member_names=names,
        adapter_paths=paths,
        partition_manifest=partition_manifest,
        eval_records_path=eval_path if eval_path.is_file() else None,
    )
