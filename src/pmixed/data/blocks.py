"""Tokenising ONE part's texts into fixed-size training blocks.

Call this once per part with that part's texts only: blocks never mix texts of different parts,
so a member's training data stays inside its part (see :mod:`pmixed.data.partition`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from pmixed.errors import ConfigError

_BATCH = 64  # texts per tokenizer call: fast tokenizers encode a batch in parallel


def tokenize_blocks(
    texts: Iterable[str], tokenizer: Any, block_size: int, *, drop_last: bool = False
) -> torch.LongTensor:
    """Token ids of one part's texts as a ``[n_blocks, block_size]`` int64 tensor.

    Each text is tokenised on its own, with no special tokens added by the tokenizer call (no
    BOS), and followed by the tokenizer's EOS id if it has one; the texts are concatenated in the
    given order and cut into consecutive blocks of ``block_size`` tokens (a block may span the
    end of one text and the start of the next, separated by EOS).

    The short final block (if any) is padded on the right with the EOS id (the pad id if the
    tokenizer has no EOS) up to ``block_size``, or dropped if ``drop_last``. Padding appears
    only in the last block, and is at most ``block_size - 1`` tokens; it is indistinguishable
    from a real EOS, so a caller that must not train on it uses ``drop_last=True``. Nothing else
    is returned or attached. No text at all gives a ``[0, block_size]`` tensor.

    Texts are encoded in batches (``tokenizer(list_of_texts)``), which a fast tokenizer runs in
    parallel; long texts are not split.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ConfigError("block_size", f"must be a positive integer, got {block_size!r}")
    if isinstance(texts, str):
        texts = [texts]
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = eos if eos is not None else getattr(tokenizer, "pad_token_id", None)

    pieces: list[np.ndarray] = []
    tail = np.asarray([eos], dtype=np.int64) if eos is not None else None
    batch: list[str] = []

    def flush() -> None:
        if not batch:
            return
        enc = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
        for ids in enc["input_ids"]:
            pieces.append(np.asarray(ids, dtype=np.int64))
            if tail is not None:
                pieces.append(tail)
        batch.clear()

    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"tokenize_blocks expects strings, got {type(text).__name__}")
        batch.append(text)
        if len(batch) >= _BATCH:
            flush()
    flush()

    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n_full, rest = divmod(len(ids), block_size)
    if rest and not drop_last:
        if pad is None:
            raise ConfigError(
                "tokenizer",
                "has neither an EOS nor a pad token to fill the last block; pass drop_last=True",
            )
        ids = np.concatenate([ids, np.full(block_size - rest, pad, dtype=np.int64)])
        n_full += 1
    blocks = torch.from_numpy(np.ascontiguousarray(ids[: n_full * block_size])).view(
        n_full, block_size
    )
    return blocks  # [n_blocks, block_size]
