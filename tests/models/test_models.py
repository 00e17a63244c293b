"""Model loading, weight fingerprints and the from-scratch tiny GPT-2."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pmixed.config import PublicPretrainConfig  # noqa: E402
from pmixed.errors import AssetError, ConfigError  # noqa: E402

WORDS = "the a cat dog sat ran on mat log quickly slowly red big small house tree".split()


def _texts(n, seed=0):
    rng = random.Random(seed)
    # a simple grammar, so a tiny model can learn it fast
    out = []
    for _ in range(n):
        sent = []
        for _ in range(12):
            sent += ["the", rng.choice(["cat", "dog"]), rng.choice(["sat", "ran"]), "on", "the"]
            sent += [rng.choice(["mat", "log"]), "."]
        out.append(" ".join(sent))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pmixed.models.tiny_gpt2 import build_gpt2, train_bpe_tokenizer

    tok = train_bpe_tokenizer(_texts(50) + [" ".join(WORDS)], 300)
    model = build_gpt2(tok, n_layer=2, n_head=2, n_embd=32, n_positions=64)
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def test_bpe_tokenizer_conventions(tiny):
    from pmixed.models.tiny_gpt2 import EOS_TOKEN

    _, _, tok = tiny
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id == 0
    ids = tok("the cat sat on the mat.")["input_ids"]
    assert tok.eos_token_id not in ids  # nothing prepended or appended
    assert tok.decode(ids) == "the cat sat on the mat."
    assert tok.decode(tok("naïve ✓")["input_ids"]) == "naïve ✓"  # byte level: no UNK


def test_load_causal_lm_local_folder_and_hash_round_trip(tiny):
    from pmixed.models.loading import load_causal_lm, tokenizer_sha256, weights_sha256

    folder, model, tok = tiny
    loaded, loaded_tok = load_causal_lm(str(folder))
    assert not loaded.training
    assert weights_sha256(loaded) == weights_sha256(model)
    assert tokenizer_sha256(loaded_tok) == tokenizer_sha256(tok)
    x = torch.tensor([tok("the dog ran")["input_ids"]])
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_weights_sha256_sensitive_and_peft_transparent(tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pmixed.models.loading import weights_sha256

    folder, _, _ = tiny
    m = AutoModelForCausalLM.from_pretrained(folder)
    h = weights_sha256(m)
    assert len(h) == 64 and h == weights_sha256(m)
    wrapped = get_peft_model(
        m, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    )
    assert weights_sha256(wrapped) == h  # LoRA tensors and PEFT renaming do not count
    base = wrapped.unload()
    with torch.no_grad():
        base.transformer.h[1].mlp.c_fc.weight[3, 4] += 1e-3
    assert weights_sha256(base) != h


def test_resolve_errors(tmp_path):
    from pmixed.models.loading import resolve_model_path

    with pytest.raises(ConfigError, match="model.base"):
        resolve_model_path("builtin:unknown")
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(AssetError, match="config.json"):
        resolve_model_path(str(tmp_path / "notamodel"))
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"  # hub name


def test_smollm2_builtin_resolves_to_asset(tmp_path):
    from pmixed.models.loading import resolve_model_path

    with pytest.raises(AssetError):  # an empty cache: the asset is not fetched
        resolve_model_path("builtin:smollm2-135m", cache_dir=tmp_path)


def test_tiny_gpt2_pretrains_caches_and_loads(tmp_path):
    from pmixed.models.loading import load_causal_lm
    from pmixed.models.tiny_gpt2 import tiny_gpt2_dir
    from pmixed.train.public_pretrain import ensure_tiny_gpt2

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(_texts(40, seed=3)):
        (corpus / f"doc{i:02d}.txt").write_text(text)
    cfg = PublicPretrainConfig(
        corpus=str(corpus),
        vocab_size=300,
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=64,
        block_size=32,
        steps=60,
        epochs=20.0,
        lr=1e-2,
        warmup_steps=5,
        batch_size=8,
        heldout_fraction=0.1,
    )
    cache = tmp_path / "cache"
    path = ensure_tiny_gpt2(cfg, cache_dir=cache, progress=False)
    assert path == tiny_gpt2_dir(cfg, cache) and path.name.startswith("tiny-gpt2-")
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    metrics = json.loads((path / "pretrain.json").read_text())
    assert metrics["heldout_ppl_after"] < 0.2 * metrics["heldout_ppl_before"]
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_gpt2(cfg, cache_dir=cache, progress=False) == path  # reused
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    model, tok = load_causal_lm("builtin:tiny-gpt2", pretrain=cfg, cache_dir=cache)
    assert model.config.n_layer == 2 and tok.eos_token == "<|endoftext|>"
