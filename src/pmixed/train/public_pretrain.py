"""Pre-training the public model ``builtin:tiny-gpt2`` on a public corpus (Brown by default).

The architecture and tokenizer come from :mod:`pmixed.models.tiny_gpt2`; here they are trained:

1. the corpus' documents are split into training and held-out documents (whole documents held
   out), and the BPE tokenizer is trained on the training documents;
2. a short pre-training run (:func:`pmixed.train.fit.fit_causal_lm`), measuring held-out
   perplexity before and after;
3. saved in Hugging Face format (safetensors + tokenizer + ``pretrain.json``) under
   ``<cache>/models/tiny-gpt2-<fingerprint>/`` and reused on later calls. The folder is written
   under a temporary name and renamed, so a crash never leaves a half-written model behind.

Importing this module registers :func:`ensure_tiny_gpt2` as the builder of ``builtin:tiny-gpt2``
(:func:`pmixed.models.builtins.register_builder`), so loading that builtin from an empty cache
pre-trains it whenever training code is loaded (``pmixed.train`` imports this module).

Only public data may be used: this model is p_0, the public model of the mechanism.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pmixed.config import PublicPretrainConfig
from pmixed.errors import DataError
from pmixed.models.builtins import BUILTIN_TINY_GPT2, register_builder
from pmixed.models.tiny_gpt2 import build_gpt2, is_built, tiny_gpt2_dir, train_bpe_tokenizer

__all__ = ["announce_pretrain", "ensure_tiny_gpt2", "pretrain_announcement", "pretrain_tiny_gpt2"]

# folders whose build was announced already in this process (by a command, before its other
# work): the build itself then does not say it again. A mark is used up by the build it announced.
_announced: set[str] = set()


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


def pretrain_announcement(cfg: PublicPretrainConfig) -> str:
    """The one line said before ``builtin:tiny-gpt2`` is pre-trained, with its expected duration."""
    params = 12 * cfg.n_layer * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd
    tokens = cfg.steps * cfg.batch_size * cfg.block_size
    minutes = 6 * params * tokens / 1e11 / 60  # ~1e11 FLOP/s measured on 2 CPU cores (quick config)
    return (f"building the public base builtin:tiny-gpt2 (pre-training on {cfg.corpus}, at most {cfg.steps} "
            f"steps; expect about {max(1, round(minutes))} min on 2 CPU cores, less on more); cached afterwards")


def announce_pretrain(cfg: PublicPretrainConfig | None = None, *, cache_dir=None) -> None:
    """Print :func:`pretrain_announcement` to stderr — always, ``-q`` or not: a step of minutes is
    never silent — and remember it, so the build that follows in this process does not repeat it."""
    cfg = cfg or PublicPretrainConfig()
    _announced.add(str(tiny_gpt2_dir(cfg, cache_dir)))
    print(pretrain_announcement(cfg), file=sys.stderr, flush=True)


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
    from pmixed.models.lm import perplexity
    from pmixed.train.fit import fit_causal_lm

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
    """Return the cached folder of the tiny GPT-2 for ``cfg``, building it on first use. A build
    is announced on stderr first (one line with the expected duration, also with ``progress=False``)
    unless :func:`announce_pretrain` said it already."""
    from pmixed.data.sources import load_records

    cfg = cfg or PublicPretrainConfig()
    final = tiny_gpt2_dir(cfg, cache_dir)
    if is_built(final):
        return final
    if str(final) in _announced:
        _announced.discard(str(final))  # said by the command that is now building it
    else:
        print(pretrain_announcement(cfg), file=sys.stderr, flush=True)
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


register_builder(BUILTIN_TINY_GPT2, ensure_tiny_gpt2)
