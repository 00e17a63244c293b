"""Brown de-tagging and detokenising on a synthetic snippet; builtin:brown on a mini-corpus."""

from __future__ import annotations

import json

from pmixed.assets import ASSETS, MARKER
from pmixed.data.brown import brown_text, detag, detokenize
from pmixed.data.sources import load_records

SNIPPET = (
    "\n\n\tThe/at Fulton/np-tl County/nn-tl said/vbd ``/`` no/at evidence/nn ''/'' ,/, "
    "and/cc 1/2/cd of/in it/pps (/( so/rb to/in speak/vb )/) was/bedz n't/* found/vbn ./.\n"
    "\tIt/pps cost/vbd $/$ 5/cd ;/. why/wrb ?/.\n\n\n"
    "\tA/at new/jj paragraph/nn :/: `/` quoted/vbn '/' text/nn ./.\n"
)


def test_detag_keeps_the_part_before_the_last_slash():
    assert detag("The/at") == "The"
    assert detag("1/2/cd") == "1/2"
    assert detag("and/or/cc") == "and/or"
    assert detag("plain") == "plain"


def test_detokenize_spacing():
    assert detokenize(["Hello", ",", "world", "!"]) == "Hello, world!"
    assert detokenize(["``", "Hi", "''", ",", "he", "said", "."]) == '"Hi", he said.'
    assert detokenize(["(", "a", ")", "b"]) == "(a) b"


def test_brown_text_of_a_snippet():
    assert brown_text(SNIPPET) == (
        'The Fulton County said "no evidence", and 1/2 of it (so to speak) wasn\'t found. '
        "It cost $5; why?\n\n"
        "A new paragraph: 'quoted' text."
    )


def test_builtin_brown_on_a_synthetic_corpus(tmp_path):
    spec = ASSETS["brown"]
    root = tmp_path / "brown"
    root.mkdir()
    (root / MARKER).write_text(json.dumps({"sha256": spec.sha256, "version": spec.version}))
    (root / "ca01").write_text(SNIPPET)
    (root / "cb02").write_text("\tAn/at editorial/nn ./.\n")
    (root / "cats.txt").write_text("ca01 news\ncb02 editorial\n")
    (root / "README").write_text("not a document")
    docs = load_records("builtin:brown", cache_dir=tmp_path)
    assert [(r.unit, r.doc_id) for r in docs] == [("ca01", "ca01"), ("cb02", "cb02")]
    assert docs[1].text == "An editorial."
    genres = load_records("builtin:brown", unit="genre", cache_dir=tmp_path)
    assert [r.unit for r in genres] == ["news", "editorial"]
