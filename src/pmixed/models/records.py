"""The records written next to trained adapters, read without any training code.

``ensemble.json`` (the ensemble manifest: :data:`MANIFEST_FORMAT`, :data:`MANIFEST_VERSION`) and a
baseline's ``<name>/<name>.json``. Training (:mod:`pmixed.train`) writes them; evaluation reads
them here: :func:`read_ensemble_manifest` and :func:`baseline_mismatch` (is a saved baseline the
one ``[lora]``/``[train]``/``[dpsgd]``... and the ensemble's base and partition call for?).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmixed.assets.registry import sha256_file
from pmixed.errors import EnsembleMismatch
from pmixed.models.peft_io import ADAPTER_WEIGHTS

if TYPE_CHECKING:  # pragma: no cover
    from pmixed.config import RunConfig

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "baseline_mismatch",
    "read_ensemble_manifest",
    "read_json",
]

MANIFEST_FORMAT = "pmixed-ensemble"
MANIFEST_VERSION = 1


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_ensemble_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / "ensemble.json"
    if not path.is_file():
        raise EnsembleMismatch(f"{directory} holds no ensemble.json: not a trained ensemble")
    manifest = read_json(path)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise EnsembleMismatch(f"{path} is not a pmixed ensemble manifest")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise EnsembleMismatch(
            f"{path} has format_version {manifest.get('format_version')}, "
            f"this pmixed reads {MANIFEST_VERSION}"
        )
    return manifest


def baseline_mismatch(cfg: RunConfig, name: str) -> list[str]:
    """Why the saved baseline ``<output_dir>/<name>/`` (``finetune``, ``dpsgd``, ``dpsgd_unit``) does not match
    ``cfg``: missing, or trained with other LoRA / training settings, another base model or
    another partition than the ensemble in the same folder. Empty when it can be reused."""
    folder = cfg.output_dir / name
    rec_path, weights = folder / f"{name}.json", folder / ADAPTER_WEIGHTS
    if not (rec_path.is_file() and weights.is_file()):
        return ["not trained yet"]
    try:
        rec = read_json(rec_path)
    except (OSError, ValueError) as err:
        return [f"unreadable record {rec_path} ({err})"]
    now = cfg.to_dict()
    section = {"finetune": "train"}.get(name, name)  # dpsgd, dpsgd_unit: their own tables
    reasons = []
    saved = dict(rec.get(section) or {})
    if section == "train":
        saved.setdefault("finetune_lr", None)  # records written before the field existed
    if saved != now[section]:
        changed = sorted(k for k in set(saved) | set(now[section]) if saved.get(k) != now[section].get(k))
        reasons.append(f"[{section}] differs ({', '.join(changed)})")
    if rec.get("lora") != now["lora"]:
        reasons.append("[lora] differs")
    manifest = folder.parent / "ensemble.json"
    if manifest.is_file():
        try:
            ens = read_json(manifest)
        except (OSError, ValueError):
            ens = {}
        if rec.get("partition", {}).get("sha256") != ens.get("partition", {}).get("sha256"):
            reasons.append("trained on another partition than the ensemble")
        if (rec.get("base_model", {}).get("weights_sha256")
                != ens.get("base_model", {}).get("weights_sha256")):
            reasons.append("trained on another base model than the ensemble")
    if sha256_file(weights) != rec.get("adapter_sha256"):
        reasons.append("adapter weights do not match their record")
    return reasons
