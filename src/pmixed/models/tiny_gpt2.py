"""``builtin:tiny-gpt2``: a small GPT-2 trained from scratch on a public corpus (Brown by default).

No GPT-2 weights are reachable offline, so the fast default base/public model is built here:

1. a byte-level BPE tokenizer (``tokenizers``) trained on the public corpus, EOS
   ``<|endoftext|>`` (also BOS/UNK/pad, as in GPT-2; nothing is prepended automatically);
2. a ``GPT2LMHeadModel`` from scratch (``n_layer`` x ``n_embd``, ``n_positions`` >= block size);
3. a short pre-training run on the corpus' training documents, measuring held-out perplexity
   (whole documents held out) before and after;
4. saved in Hugging Face format (safetensors + tokenizer + ``pretrain.json``) under
   ``<cache>/models/tiny-gpt2-<fingerprint>/`` and reused on later calls. The folder is written
   under a temporary name and renamed, so a crash never leaves a half-written model behind.

Only public data may be used: this model is p_0, the public model of the mechanism.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from pmixed.config import PublicPretrainConfig
from pmixed.errors import DataError
from pmixed.models.loading import cache_root

__all__ = [
    "EOS_TOKEN",
    "tiny_gpt2_dir",
    "ensure_tiny_gpt2",
    "train_bpe_tokenizer",
    "build_gpt2",
    "pretrain_tiny_gpt2",
]

EOS_TOKEN = "<|endoftext|>"


def tiny_gpt2_dir(cfg: PublicPretrainConfig, cache_dir=None) -> Path:
    return cache_root(cache_dir) / "models" / f"tiny-gpt2-{cfg.fingerprint()}"


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int, *, min_frequency: int = 2):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (GPT-2 conventions)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=1 << 30,
    )
    return fast


def build_gpt2(
    tokenizer, *, n_layer: int, n_head: int, n_embd: int, n_positions: int, seed: int = 0
):
    """A randomly initialised ``GPT2LMHeadModel`` sized for ``tokenizer`` (dropout off)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.eval()
    return model


def _split_documents(records, heldout_fraction: float, seed: int):
    """Hold out whole documents (by ``doc_id``) for the perplexity check."""
    docs = sorted({r.doc_id for r in records})
    if len(docs) < 2:
        raise DataError("the public pre-training corpus needs at least 2 documents")
    rng = random.Random(seed)
    rng.shuffle(docs)
    n_held = max(1, round(len(docs) * heldout_fraction))
    held = set(docs[:n_held])
    train = [r.text for r in records if r.doc_id not in held]
    heldout = [r.text for r in records if r.doc_id in held]
    return train, heldout


def pretrain_tiny_gpt2(
    cfg: PublicPretrainConfig,
    train_texts: Sequence[str],
    heldout_texts: Sequence[str],
    *,
    progress: bool = True,
):
    """Tokenizer + model + pre-training. Returns ``(model, tokenizer, metrics)``."""
    import torch

    from pmixed.data.blocks import tokenize_blocks
    from pmixed.models.lm import fit_causal_lm, perplexity

    t0 = time.perf_counter()
    tokenizer = train_bpe_tokenizer(train_texts, cfg.vocab_size)
    t_tok = time.perf_counter() - t0
    train_blocks = tokenize_blocks(list(train_texts), tokenizer, cfg.block_size, drop_last=True)
    held_blocks = tokenize_blocks(list(heldout_texts), tokenizer, cfg.block_size, drop_last=True)
    if train_blocks.size(0) == 0 or held_blocks.size(0) == 0:
        raise DataError("public corpus too small for one training and one held-out block")
    g = torch.Generator().manual_seed(cfg.seed)
    held_eval = held_blocks[torch.randperm(held_blocks.size(0), generator=g)[:64]]
    model = build_gpt2(
        tokenizer,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        n_positions=cfg.n_positions,
        seed=cfg.seed,
    )
    ppl_before = perplexity(model, held_eval)
    fit = fit_causal_lm(
        model,
        train_blocks,
        epochs=cfg.epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        weight_decay=cfg.weight_decay,
        max_steps=cfg.steps,
        warmup_steps=cfg.warmup_steps,
        grad_clip=1.0,
        seed=cfg.seed,
        cosine=True,
        progress=progress,
        desc="pretrain tiny-gpt2",
    )
    ppl_after = perplexity(model, held_eval)
    metrics = {
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "fingerprint": cfg.fingerprint(),
        "vocab_size": len(tokenizer),
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_blocks": int(train_blocks.size(0)),
        "heldout_blocks_evaluated": int(held_eval.size(0)),
        "steps": fit.steps,
        "tokens_seen": fit.tokens,
        "tokenizer_seconds": round(t_tok, 2),
        "train_seconds": round(fit.seconds, 2),
        "tokens_per_second": round(fit.tokens / max(fit.seconds, 1e-9), 1),
        "final_train_loss": fit.final_loss,
        "heldout_ppl_before": ppl_before,
        "heldout_ppl_after": ppl_after,
    }
    return model, tokenizer, metrics


def ensure_tiny_gpt2(
    cfg: PublicPretrainConfig | None = None,
    *,
    cache_dir=None,
    progress: bool = True,
) -> Path:
    """Return the cached folder of the tiny GPT-2 for ``cfg``, building it on first use."""
    from pmixed.data.sources import load_records

    cfg = cfg or PublicPretrainConfig()
    final = tiny_gpt2_dir(cfg, cache_dir)
    if (final / "config.json").is_file() and (final / "pretrain.json").is_file():
        return final
    records = load_records(cfg.corpus, cache_dir=cache_dir)
    train_texts, heldout_texts = _split_documents(records, cfg.heldout_fraction, cfg.seed)
    model, tokenizer, metrics = pretrain_tiny_gpt2(
        cfg, train_texts, heldout_texts, progress=progress
    )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(json.dumps(metrics, indent=2) + "\n")
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "config.json").is_file():
            raise
    if progress:
        print(
            f"tiny-gpt2 pre-trained on {cfg.corpus}: held-out perplexity "
            f"{metrics['heldout_ppl_before']:.1f} -> {metrics['heldout_ppl_after']:.1f} "
            f"in {metrics['train_seconds']:.0f}s; saved to {final}"
        )
    return final
