"""The ``builtin:`` model names and what each resolves to.

* ``builtin:tiny-gpt2``: the small GPT-2 pre-trained on a public corpus
  (:mod:`pmixed.models.tiny_gpt2`), found in the cache by its ``[public_pretrain]`` fingerprint.
  Building it is training, so it is not done here: :mod:`pmixed.train.public_pretrain` registers
  its builder with :func:`register_builder` when imported (any ``pmixed.train`` import does), and
  an uncached tiny-gpt2 is built through that builder. Without one, the error says how to build it.
* ``builtin:smollm2-135m``: the offline asset (fetch it with ``pmixed assets fetch``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pmixed.errors import AssetError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from pmixed.config import PublicPretrainConfig

__all__ = [
    "BUILTIN_PREFIX",
    "BUILTIN_SMOLLM2",
    "BUILTIN_TINY_GPT2",
    "Builder",
    "is_builtin",
    "register_builder",
    "resolve_builtin",
]

BUILTIN_PREFIX = "builtin:"
BUILTIN_TINY_GPT2 = "builtin:tiny-gpt2"
BUILTIN_SMOLLM2 = "builtin:smollm2-135m"

#: ``build(pretrain_cfg, *, cache_dir, progress) -> folder`` of a builtin that is built on first use.
Builder = Callable[..., Path]
_BUILDERS: dict[str, Builder] = {}


def register_builder(name: str, build: Builder) -> None:
    """Make ``build`` the way an uncached ``name`` (e.g. ``builtin:tiny-gpt2``) is built."""
    _BUILDERS[name] = build


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def resolve_builtin(
    name: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    pretrain: PublicPretrainConfig | None = None,
    progress: bool = True,
) -> Path:
    """The folder a ``builtin:`` name stands for (built first when it is built on first use)."""
    if name == BUILTIN_TINY_GPT2:
        from pmixed.config import PublicPretrainConfig
        from pmixed.models.tiny_gpt2 import is_built, tiny_gpt2_dir

        cfg = pretrain or PublicPretrainConfig()
        folder = tiny_gpt2_dir(cfg, cache_dir)
        if is_built(folder):
            return folder
        build = _BUILDERS.get(name)
        if build is None:
            raise AssetError(
                f"{name} for this [public_pretrain] is not built in {folder.parent}: run "
                "`pmixed train pretrain --config ...` (or import pmixed.train, whose pre-training "
                "builds it on first use)"
            )
        return Path(build(cfg, cache_dir=cache_dir, progress=progress))
    if name == BUILTIN_SMOLLM2:
        from pmixed.assets.registry import asset_path

        return asset_path("smollm2-135m", cache_dir=cache_dir)
    raise ConfigError("model.base", f"unknown builtin model {name!r}")
