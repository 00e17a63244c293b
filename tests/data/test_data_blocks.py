"""tokenize_blocks against a straightforward reference, on a small synthetic tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pmixed.data.blocks import tokenize_blocks
from pmixed.errors import ConfigError

WORDS = ["[UNK]", "[BOS]", "[EOS]", "[PAD]", "a", "b", "c", "hello", "world", "x", "y", "z"]


def make_tokenizer(*, eos: bool = True, pad: bool = True, bos_template: bool = True):
    """A word-level fast tokenizer whose post-processor would add BOS/EOS if asked to."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(
            single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1), ("[EOS]", 2)]
        )
    kwargs = {"unk_token": "[UNK]", "bos_token": "[BOS]"}
    if eos:
        kwargs["eos_token"] = "[EOS]"
    if pad:
        kwargs["pad_token"] = "[PAD]"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


TOK = make_tokenizer()


def reference(texts, block_size, drop_last, eos=2, pad=2):
    ids = []
    for t in texts:
        ids += [WORDS.index(w) if w in WORDS else 0 for w in t.split()]
        if eos is not None:
            ids.append(eos)
    blocks = [ids[i : i + block_size] for i in range(0, len(ids), block_size)]
    if blocks and len(blocks[-1]) < block_size:
        if drop_last:
            blocks.pop()
        else:
            blocks[-1] = blocks[-1] + [pad] * (block_size - len(blocks[-1]))
    return blocks


def test_example():
    texts = ["hello world", "a b c", "x"]  # 6 words + 3 EOS = 9 tokens
    out = tokenize_blocks(texts, TOK, 3)
    assert out.dtype == torch.int64 and out.shape == (3, 3)
    # no BOS (id 1) although the tokenizer's template would add one; EOS (2) after each text
    assert out.tolist() == [[7, 8, 2], [4, 5, 6], [2, 9, 2]]
    out = tokenize_blocks(texts, TOK, 4)
    assert out.tolist() == [[7, 8, 2, 4], [5, 6, 2, 9], [2, 2, 2, 2]]  # last block: EOS + 3 pads
    assert tokenize_blocks(texts, TOK, 4, drop_last=True).tolist() == [[7, 8, 2, 4], [5, 6, 2, 9]]
    out = tokenize_blocks(texts + ["y"], TOK, 4)
    assert out.tolist() == [[7, 8, 2, 4], [5, 6, 2, 9], [2, 10, 2, 2]]
    assert tokenize_blocks("hello world", TOK, 3).tolist() == [[7, 8, 2]]  # a lone str is one text


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(
        st.lists(st.sampled_from(WORDS[4:] + ["unknown"]), max_size=12).map(" ".join), max_size=150
    ),
    block_size=st.integers(1, 9),
    drop_last=st.booleans(),
)
def test_matches_reference(texts, block_size, drop_last):
    out = tokenize_blocks(texts, TOK, block_size, drop_last=drop_last)
    expected = reference(texts, block_size, drop_last)
    assert out.shape == (len(expected), block_size)
    assert out.tolist() == expected


def test_empty_input_and_bad_block_size():
    assert tokenize_blocks([], TOK, 8).shape == (0, 8)
    with pytest.raises(ConfigError) as err:
        tokenize_blocks(["a"], TOK, 0)
    assert err.value.field == "block_size"


def test_without_eos_pads_with_pad_or_needs_drop_last():
    no_eos = make_tokenizer(eos=False)
    assert tokenize_blocks(["a b c"], no_eos, 2).tolist() == [[4, 5], [6, 3]]  # no EOS; pad id 3
    neither = make_tokenizer(eos=False, pad=False)
    assert tokenize_blocks(["a b c"], neither, 2, drop_last=True).tolist() == [[4, 5]]
    with pytest.raises(ConfigError, match="drop_last"):
        tokenize_blocks(["a b c"], neither, 2)
