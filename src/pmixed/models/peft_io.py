"""Reading PEFT LoRA adapters: folders written by ``PeftModel.save_pretrained`` and in-memory
state dicts, checked to be vanilla LoRA (no DoRA, biases, extra trainable tensors...).

Gives, per adapter, its config dict and ``{module_name: {"A": [r, in], "B": [out, r]}}``, and
the ``(r, scaling)`` PEFT would use for a module (``rank_pattern``/``alpha_pattern``, rsLoRA).
Consumed by :class:`pmixed.models.stacked_lora.StackedLoRA`; torch only, no PEFT import.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pmixed.errors import EnsembleMismatch

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "check_config",
    "config_dict",
    "module_rank_scaling",
    "read_adapter_dir",
    "split_state_dict",
]

#: The files of a PEFT adapter folder.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_BIN_NAME = "adapter_model.bin"

# Key of a LoRA tensor in a PEFT adapter state dict, e.g.
# "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" (saved by save_pretrained) or
# "transformer.h.0.attn.c_attn.lora_A.default.weight" (a raw PeftModel state dict).
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"
)

# LoraConfig fields that change the forward beyond vanilla LoRA (variants, extra trainable
# tensors, biases). Any truthy value is refused rather than silently ignored.
_UNSUPPORTED_FIELDS = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "trainable_token_indices",
    "layer_replication",
    "target_parameters",
    "use_qalora",
    "alora_invocation_tokens",
    "velora_config",
    "monteclora_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "megatron_config",
)


def _pattern_key(pattern_keys: Sequence[str], module_name: str) -> str | None:
    """PEFT's rank_pattern/alpha_pattern matching (``peft.utils.other.get_pattern_key``)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    return dict(vars(config))


def module_rank_scaling(cfg: Mapping[str, Any], module_name: str) -> tuple[int, float]:
    """The (r, scaling) PEFT would give ``module_name`` under adapter config ``cfg``."""
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rk = _pattern_key(list(rank_pattern), module_name)
    ak = _pattern_key(list(alpha_pattern), module_name)
    r = int(rank_pattern[rk]) if rk is not None else int(cfg.get("r", 8))
    alpha = float(alpha_pattern[ak]) if ak is not None else float(cfg.get("lora_alpha", 8))
    if r <= 0:
        raise ValueError(f"rank r={r} for {module_name} is not positive")
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora", False) else alpha / r
    return r, scaling


def check_config(cfg: Mapping[str, Any]) -> None:
    peft_type = cfg.get("peft_type", "LORA")
    if str(getattr(peft_type, "value", peft_type)).upper() != "LORA":
        raise ValueError(f"peft_type is {peft_type!r}, only LORA adapters are supported")
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise ValueError(f"bias={bias!r} trains base biases; only bias='none' is supported")
    for name in _UNSUPPORTED_FIELDS:
        if cfg.get(name):
            raise ValueError(f"{name}={cfg[name]!r} is not supported (vanilla LoRA only)")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower() == "mica":
        raise ValueError("init_lora_weights='mica' is a LoRA variant, not supported")


def split_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module_name: {"A": [r, in], "B": [out, r]}}; refuses keys that are not LoRA A/B."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise ValueError(
                f"unexpected tensor {key!r} (only lora_A/lora_B weights are supported)"
            )
        slot = out.setdefault(m.group("module"), {})
        if m.group("ab") in slot:
            raise ValueError(f"duplicate lora_{m.group('ab')} for module {m.group('module')!r}")
        slot[m.group("ab")] = tensor
    for name, slot in out.items():
        if set(slot) != {"A", "B"}:
            raise ValueError(f"module {name!r} has lora_A without lora_B or vice versa")
        a, b = slot["A"], slot["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"module {name!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not "
                "[r, in] and [out, r]"
            )
    if not out:
        raise ValueError("no LoRA tensors found")
    return out


def read_adapter_dir(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, state dict) of one PEFT adapter folder; raises EnsembleMismatch naming it."""
    try:
        if not path.is_dir():
            raise FileNotFoundError("adapter folder does not exist")
        cfg_path = path / ADAPTER_CONFIG
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{ADAPTER_CONFIG} is missing")
        with open(cfg_path, encoding="utf-8") as fh:
            cfg = json.load(fh)
        if not isinstance(cfg, dict):
            raise ValueError(f"{ADAPTER_CONFIG} is not a JSON object")
        st_path, bin_path = path / ADAPTER_WEIGHTS, path / _BIN_NAME
        if st_path.is_file():
            from safetensors.torch import load_file

            sd = load_file(str(st_path), device="cpu")
        elif bin_path.is_file():
            sd = torch.load(str(bin_path), map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"neither {ADAPTER_WEIGHTS} nor {_BIN_NAME} is present")
    except EnsembleMismatch:
        raise
    except Exception as exc:  # corrupt JSON, truncated safetensors header, unreadable file...
        raise EnsembleMismatch(f"LoRA adapter {str(path)!r}: cannot be loaded: {exc}") from exc
    return cfg, sd
