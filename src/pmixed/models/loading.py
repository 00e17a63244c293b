"""Loading base causal LMs (builtins, local folders, hub names) and fingerprinting their weights."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmixed.errors import AssetError, ConfigError
from pmixed.models.builtins import BUILTIN_SMOLLM2, BUILTIN_TINY_GPT2, is_builtin, resolve_builtin

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from pmixed.config import PublicPretrainConfig

__all__ = [
    "BUILTIN_TINY_GPT2",
    "BUILTIN_SMOLLM2",
    "resolve_model_path",
    "load_causal_lm",
    "weights_sha256",
    "tokenizer_sha256",
    "parse_dtype",
]


def parse_dtype(dtype: Any) -> torch.dtype:
    """``torch.float32`` or its name (``"float32"``, ``"bfloat16"``, ``"float16"``)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ConfigError("model.dtype", f"must be one of {', '.join(table)}; got {dtype!r}")
    return table[dtype]


def resolve_model_path(
    name_or_path: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    pretrain: PublicPretrainConfig | None = None,
    progress: bool = True,
) -> str:
    """Map a model name to what ``from_pretrained`` takes.

    ``builtin:tiny-gpt2`` is the cached model pre-trained from ``pretrain`` (built on first use
    when :mod:`pmixed.train` is loaded, see :mod:`pmixed.models.builtins`);
    ``builtin:smollm2-135m`` is the offline asset (fetch it with ``pmixed assets fetch``);
    an existing folder is used as is; anything else is passed on as a hub name.
    """
    if is_builtin(name_or_path):  # pmixed.models.builtins
        return str(
            resolve_builtin(name_or_path, cache_dir=cache_dir, pretrain=pretrain, progress=progress)
        )
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise AssetError(
                f"{p} exists but holds no config.json: not a Hugging Face model folder"
            )
        return str(p)
    return name_or_path  # a hub name: transformers resolves (and caches) it


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: Any = "float32",
    device: str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    pretrain: PublicPretrainConfig | None = None,
    attn_implementation: str | None = None,
    progress: bool = True,
):
    """Load a causal LM and its tokenizer: ``(model, tokenizer)``, model in eval mode on ``device``.

    Works for the builtins (see :func:`resolve_model_path`), local folders and hub names. A
    tokenizer without a pad token gets its EOS token as pad (GPT-2 style); no BOS is added by
    the loader itself: the tokenizer's own post-processor decides.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(
        name_or_path, cache_dir=cache_dir, pretrain=pretrain, progress=progress
    )
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise AssetError(f"cannot load model {name_or_path!r} from {path!r}: {err}") from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer


def _base_state_items(model) -> list[tuple[str, Any]]:
    """State dict of the *base* weights in name order.

    On a PEFT-wrapped model the LoRA tensors are skipped and PEFT's renaming
    (``base_model.model.`` prefix, ``.base_layer`` infix) is undone, so a wrapped model hashes
    like the raw base it was built on.
    """
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        PeftModel = ()  # type: ignore[assignment]
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    items = []
    for name, t in model.state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        items.append((name.replace(".base_layer.", "."), t))
    items.sort(key=lambda kv: kv[0])
    return items


def weights_sha256(model) -> str:
    """SHA-256 over the base model's tensors in name order (name, dtype, shape, raw bytes).

    Stable across processes and save/load round trips; independent of attached (unmerged)
    LoRA adapters. Tied weights appear under each of their names, as in ``state_dict()``.
    """
    import torch

    h = hashlib.sha256()
    for name, t in _base_state_items(model):
        t = t.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """SHA-256 of a tokenizer's full serialisation (fast tokenizers) or of its vocabulary."""
    import json

    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # pragma: no cover - slow tokenizers
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()
