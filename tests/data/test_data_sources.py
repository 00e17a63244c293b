"""Local-file loaders, the unit-column checks, skip counting, and the offline hf: error."""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from pmixed.data.records import Record
from pmixed.data.sources import load_records
from pmixed.errors import DataError


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "wb") as f:
        for row in rows:
            f.write(json.dumps(row).encode() + b"\n")
        for line in extra_lines:
            f.write(line + b"\n")
    return path


def test_jsonl_with_unit_column(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"user": "alice", "text": "hello there"},
            {"user": "bob", "text": "hi", "id": "m2"},
            {"user": "alice", "text": "again"},
        ],
    )
    recs = load_records(str(path), unit="user")
    assert recs == [
        Record("alice", "hello there", "0"),
        Record("bob", "hi", "m2"),
        Record("alice", "again", "2"),
    ]
    assert load_records(str(path), unit="user", limit=2) == recs[:2]


def test_missing_unit_column_names_it_and_lists_the_available_ones(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"author": "a", "body": "x", "date": 1}])
    with pytest.raises(DataError) as err:
        load_records(str(path), unit="user", text_column="body")
    msg = str(err.value)
    assert "'user'" in msg and "not found" in msg and "author, body, date" in msg
    with pytest.raises(
        DataError, match="text column 'text' not found; available columns: author, body, date"
    ):
        load_records(str(path), unit="author")


def test_unit_none_needs_a_unit_column_or_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"who": "a", "text": "x"}, {"who": "a", "text": "y"}])
    with pytest.raises(DataError, match="unit=COLUMN.*available columns: who, text"):
        load_records(str(path))
    rows = load_records(str(path), unit="row")
    assert [r.unit for r in rows] == ["0", "1"]
    path2 = write_jsonl(tmp_path / "e.jsonl", [{"unit": "u1", "text": "x"}])
    assert load_records(str(path2))[0].unit == "u1"


def test_csv_and_tsv(tmp_path):
    (tmp_path / "d.csv").write_text(
        'user,text\nalice,"Hello, world"\nbob,"two\nlines"\n,"no unit"\ncarol,\n'
    )
    with caplog_at_warning() as logs:
        recs = load_records(str(tmp_path / "d.csv"), unit="user")
    assert recs == [Record("alice", "Hello, world", "0"), Record("bob", "two\nlines", "1")]
    assert (
        "skipped 2 of 4" in logs.text
        and "1 empty" in logs.text
        and "1 without a unit value" in logs.text
    )
    (tmp_path / "d.tsv").write_text("u\tbody\nx\tsome text\n")
    assert load_records(str(tmp_path / "d.tsv"), unit="u", text_column="body") == [
        Record("x", "some text", "0")
    ]


def test_undecodable_and_empty_rows_are_counted_and_skipped(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"unit": "a", "text": "ok"}, {"unit": "b", "text": "   "}],
        extra_lines=[b'{"unit": "c", "text": "caf\xe9"}'],  # latin-1 byte, not UTF-8
    )
    with caplog.at_level(logging.WARNING, logger="pmixed.data"):
        recs = load_records(str(path))
    assert [r.unit for r in recs] == ["a"]
    assert (
        "skipped 2 of 3" in caplog.text
        and "1 undecodable" in caplog.text
        and "1 empty" in caplog.text
    )
    (tmp_path / "bad.csv").write_bytes(b"unit,text\na,fine\nb,caf\xe9\n")
    with caplog.at_level(logging.WARNING, logger="pmixed.data"):
        assert [r.unit for r in load_records(str(tmp_path / "bad.csv"))] == ["a"]


def test_no_records_at_all_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"unit": "a", "text": ""}])
    with pytest.raises(DataError, match="no usable records"):
        load_records(str(path))


def test_malformed_jsonl_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"unit": "a", "text": "x"}], extra_lines=[b"{oops"])
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_records(str(path))


def test_txt_file_and_directory(tmp_path):
    (tmp_path / "one.txt").write_text("A single document.")
    assert load_records(str(tmp_path / "one.txt")) == [
        Record("one", "A single document.", "one.txt")
    ]
    root = tmp_path / "corpus"
    (root / "alice").mkdir(parents=True)
    (root / "bob" / "2020").mkdir(parents=True)
    (root / "alice" / "a1.txt").write_text("alice one")
    (root / "alice" / "a2.txt").write_text("alice two")
    (root / "bob" / "2020" / "b1.txt").write_text("bob one")
    (root / "bob" / "empty.txt").write_text("")
    (root / "bob" / "notes.md").write_text("ignored")
    by_file = load_records(str(root))
    assert [(r.unit, r.doc_id) for r in by_file] == [
        ("a1", "alice/a1.txt"),
        ("a2", "alice/a2.txt"),
        ("b1", "bob/2020/b1.txt"),
    ]
    by_dir = load_records(str(root), unit="dir")
    assert [r.unit for r in by_dir] == ["alice", "alice", "bob"]
    (root / "loose.txt").write_text("no folder")
    with pytest.raises(DataError, match="sub-folder"):
        load_records(str(root), unit="dir")
    with pytest.raises(DataError, match="unknown unit 'speaker'; available units: file, dir"):
        load_records(str(root), unit="speaker")


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(str(tmp_path / "x.parquet"))
    with pytest.raises(DataError, match="unknown builtin source"):
        load_records("builtin:nope")
    with pytest.raises(DataError, match="split 'test' is not available"):
        load_records(str(tmp_path / "x.parquet"), split="test")
    with pytest.raises(DataError, match="available units: president, speech, party"):
        load_records("builtin:sotu", unit="year")


def test_hf_source_offline_error_message():
    pytest.importorskip("datasets")
    with pytest.raises(DataError) as err:
        load_records("hf:pmixed-test/does-not-exist:cfg", unit="user")
    msg = str(err.value)
    assert "could not load Hugging Face dataset 'pmixed-test/does-not-exist'" in msg
    assert "config 'cfg'" in msg and "split 'train'" in msg
    assert "\n" not in msg


class caplog_at_warning:
    """A tiny stand-alone log capture (usable inside a test without the caplog fixture)."""

    def __enter__(self):
        self.text = ""
        outer = self

        class H(logging.Handler):
            def emit(self, record):
                outer.text += record.getMessage() + "\n"

        self.handler = H(level=logging.WARNING)
        logging.getLogger("pmixed.data").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logging.getLogger("pmixed.data").removeHandler(self.handler)
