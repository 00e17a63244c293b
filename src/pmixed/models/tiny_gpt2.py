"""``builtin:tiny-gpt2``, the architecture: its tokenizer, its model and where it is cached.

No GPT-2 weights are reachable offline, so the fast default base/public model is built from
scratch on a public corpus (Brown by default):

1. a byte-level BPE tokenizer (``tokenizers``) trained on the public corpus, EOS
   ``<|endoftext|>`` (also BOS/UNK/pad, as in GPT-2; nothing is prepended automatically):
   :func:`train_bpe_tokenizer`;
2. a ``GPT2LMHeadModel`` from scratch (``n_layer`` x ``n_embd``, ``n_positions`` >= block size):
   :func:`build_gpt2`;
3. pre-trained and saved under :func:`tiny_gpt2_dir` (``<cache>/models/tiny-gpt2-<fingerprint>/``)
   by :mod:`pmixed.train.public_pretrain` (pre-training is training, not model loading).

Only public data may be used: this model is p_0, the public model of the mechanism.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pmixed.assets.registry import cache_root
from pmixed.config import PublicPretrainConfig

__all__ = [
    "EOS_TOKEN",
    "tiny_gpt2_dir",
    "is_built",
    "train_bpe_tokenizer",
    "build_gpt2",
]

EOS_TOKEN = "<|endoftext|>"


def tiny_gpt2_dir(cfg: PublicPretrainConfig, cache_dir=None) -> Path:
    """The cache folder of the tiny GPT-2 pre-trained with ``cfg``."""
    return cache_root(cache_dir) / "models" / f"tiny-gpt2-{cfg.fingerprint()}"


def is_built(folder: Path) -> bool:
    """True when ``folder`` holds a finished pre-trained model (written last: ``pretrain.json``)."""
    return (folder / "config.json").is_file() and (folder / "pretrain.json").is_file()


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
