"""Loading documents, each tagged with its privacy unit, from the supported sources.

``source`` forms (see :func:`load_records`):

=====================  ==========================================  =============================
source                 what                                        ``unit`` (default first)
=====================  ==========================================  =============================
``builtin:sotu``       State of the Union addresses (asset sotu)   president, speech, party
``builtin:spam-ham``   SpamAssassin ham mail, cleaned bodies       sender, message
``builtin:brown``      Brown corpus, de-tagged                     document, genre
``builtin:moby-dick``  Moby Dick, one record per chapter           chapter
``path/file.txt``      one document                                file (the file stem)
``path/dir/``          every ``*.txt`` below it, one document each file (stem), dir (first
                                                                   sub-folder under the root)
``path/file.jsonl``    one document per row                        a column name; "row"
``path/file.csv|tsv``  one document per row                        a column name; "row"
``hf:NAME[:CONFIG]``   ``datasets.load_dataset(NAME, CONFIG)``     a column name; "row"
=====================  ==========================================  =============================

For tabular sources ``unit=None`` uses a column named ``unit`` if there is one and otherwise
fails: silently treating each row as its own unit would split a user's data across parts, which
breaks the group guarantee. ``unit="row"`` asks for that explicitly.

Records come out in a deterministic order (sorted file names, file row order). Rows and files
that cannot be used (empty text, undecodable bytes, no unit value, mail without a text/plain
body) are skipped and counted, and a single warning reports the counts. No usable record at all
raises :class:`DataError`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pmixed.data.records import Record
from pmixed.errors import DataError

log = logging.getLogger("pmixed.data")

BUILTIN_UNITS: dict[str, tuple[str, ...]] = {
    "sotu": ("president", "speech", "party"),
    "spam-ham": ("sender", "message"),
    "brown": ("document", "genre"),
    "moby-dick": ("chapter",),
}
SPAM_HAM_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1")
_SOTU_PARTIES = {
    "d": "Democratic",
    "dr": "Democratic-Republican",
    "f": "Federalist",
    "n": "none",
    "nu": "National Union",
    "r": "Republican",
    "w": "Whig",
    "wd": "Whig & Democratic",
}


class _Skips:
    """Counts skipped items by reason and logs one warning at the end."""

    def __init__(self, source: str):
        self.source = source
        self.counts: Counter[str] = Counter()

    def add(self, reason: str) -> None:
        self.counts[reason] += 1

    def report(self, kept: int) -> None:
        if self.counts:
            total = sum(self.counts.values())
            detail = ", ".join(f"{n} {why}" for why, n in sorted(self.counts.items()))
            log.warning(
                "%s: skipped %d of %d documents (%s)", self.source, total, total + kept, detail
            )


def load_records(
    source: str,
    *,
    unit: str | None = None,
    text_column: str = "text",
    split: str = "train",
    cache_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> list[Record]:
    """Load documents from ``source`` as :class:`Record` s tagged with their privacy unit.

    ``unit`` picks the privacy unit (a column for tabular data, a named choice for builtins);
    ``text_column`` the text column of tabular data; ``split`` the split of an ``hf:`` dataset
    (other sources have only ``"train"``: evaluation units are held out by the partitioner);
    ``cache_dir`` the asset cache of ``builtin:`` sources; ``limit`` keeps the first N records.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or None, got {limit!r}")
    skips = _Skips(source)
    if source.startswith("hf:"):
        rows = _hf_records(source, unit, text_column, split, skips)
    else:
        if split != "train":
            raise DataError(
                f"{source}: split {split!r} is not available; only 'train' (held-out evaluation "
                "units are chosen by partition_by_unit)"
            )
        if source.startswith("builtin:"):
            rows = _builtin_records(source, unit, cache_dir, skips)
        else:
            rows = _path_records(source, unit, text_column, skips)
    records: list[Record] = []
    for rec in rows:
        records.append(rec)
        if limit is not None and len(records) >= limit:
            break
    skips.report(len(records))
    if not records:
        raise DataError(f"{source}: no usable records (empty texts or nothing matched)")
    return records


def _make(unit: Any, text: Any, doc_id: str, skips: _Skips) -> Record | None:
    if unit is None or (isinstance(unit, str) and not unit.strip()):
        skips.add("without a unit value")
        return None
    if not isinstance(text, str) or not text.strip():
        skips.add("empty")
        return None
    if _has_surrogates(text):
        skips.add("undecodable")
        return None
    return Record(unit=str(unit), text=text, doc_id=doc_id)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_choice(source: str, unit: str | None, choices: tuple[str, ...]) -> str:
    if unit is None:
        return choices[0]
    if unit not in choices:
        raise DataError(f"{source}: unknown unit {unit!r}; available units: {', '.join(choices)}")
    return unit


# ---------------------------------------------------------------------------------------------
# builtin:


def _builtin_records(
    source: str, unit: str | None, cache_dir: Any, skips: _Skips
) -> Iterator[Record]:
    from pmixed.assets.registry import asset_path

    name = source.removeprefix("builtin:")
    if name not in BUILTIN_UNITS:
        raise DataError(
            f"unknown builtin source {source!r}; available: "
            + ", ".join(f"builtin:{n}" for n in BUILTIN_UNITS)
        )
    unit = _check_choice(source, unit, BUILTIN_UNITS[name])
    if name == "sotu":
        return _sotu(asset_path("sotu", cache_dir), unit, skips)
    if name == "spam-ham":
        return _spam_ham(asset_path("spam-assassin", cache_dir), unit, skips)
    if name == "moby-dick":
        return _moby_dick(asset_path("moby-dick", cache_dir), skips)
    return _brown(asset_path("brown", cache_dir), unit, skips)


def _sotu(root: Path, unit: str, skips: _Skips) -> Iterator[Record]:
    for path in sorted((root / "data").glob("*.json")):
        try:
            row = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            skips.add("undecodable")
            continue
        key = {"president": row.get("name"), "speech": path.stem, "party": row.get("party")}[unit]
        if unit == "party" and isinstance(key, str):
            key = _SOTU_PARTIES.get(key, key)
        rec = _make(key, row.get("text"), path.stem, skips)
        if rec is not None:
            yield rec


def _moby_dick(root: Path, skips: _Skips) -> Iterator[Record]:
    def number(path: Path) -> int:
        tail = path.stem.rpartition("_")[2]
        return int(tail) if tail.isdigit() else 10**9

    for path in sorted((root / "data").glob("chapter_*.json"), key=number):
        try:
            row = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            skips.add("undecodable")
            continue
        rec = _make(f"chapter {row.get('chapter', path.stem)}", row.get("text"), path.stem, skips)
        if rec is not None:
            yield rec


def _spam_ham(root: Path, unit: str, skips: _Skips) -> Iterator[Record]:
    from pmixed.data.mail import mail_text

    for group in SPAM_HAM_GROUPS:
        for path in sorted((root / "data" / group).glob("*.txt")):
            doc_id = f"{group}/{path.stem}"
            try:
                sender, body = mail_text(path.read_bytes())
            except Exception:  # a message the parser cannot make sense of
                skips.add("unparseable")
                continue
            if body is None:
                skips.add("without a text/plain body")
                continue
            if unit == "sender" and not sender:
                skips.add("without a sender")
                continue
            rec = _make(sender if unit == "sender" else doc_id, body, doc_id, skips)
            if rec is not None:
                yield rec


def _brown(root: Path, unit: str, skips: _Skips) -> Iterator[Record]:
    from pmixed.data.brown import brown_text, is_brown_file

    genres: dict[str, str] = {}
    cats = root / "cats.txt"
    if cats.exists():
        for line in cats.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) >= 2:
                genres[parts[0]] = parts[1]
    for path in sorted(p for p in root.iterdir() if is_brown_file(p.name)):
        text = _read_text(path, skips)
        if text is None:
            continue
        key = path.name if unit == "document" else genres.get(path.name, path.name[:2])
        rec = _make(key, brown_text(text), path.name, skips)
        if rec is not None:
            yield rec


# ---------------------------------------------------------------------------------------------
# local paths


def _read_text(path: Path, skips: _Skips) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        skips.add("undecodable")
        return None


def _path_records(
    source: str, unit: str | None, text_column: str, skips: _Skips
) -> Iterator[Record]:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"{source}: no such file or directory (sources are builtin:sotu, builtin:spam-ham, "
            "builtin:brown, builtin:moby-dick, hf:NAME[:CONFIG], or a .txt/.jsonl/.csv/.tsv file or a folder of .txt files)"
        )
    if path.is_dir():
        return _txt_dir(path, unit, skips)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        _check_choice(source, unit, ("file",))
        return _txt_file(path, skips)
    if suffix == ".jsonl":
        return _table(source, _jsonl_rows(path), unit, text_column, skips)
    if suffix in (".csv", ".tsv"):
        return _table(
            source, _csv_rows(path, "\t" if suffix == ".tsv" else ","), unit, text_column, skips
        )
    raise DataError(f"{source}: unsupported file type {suffix!r}; use .txt, .jsonl, .csv or .tsv")


def _txt_file(path: Path, skips: _Skips) -> Iterator[Record]:
    text = _read_text(path, skips)
    if text is not None:
        rec = _make(path.stem, text, path.name, skips)
        if rec is not None:
            yield rec


def _txt_dir(root: Path, unit: str | None, skips: _Skips) -> Iterator[Record]:
    unit = _check_choice(str(root), unit, ("file", "dir"))
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if unit == "dir":
        loose = [p.name for p in files if p.parent == root]
        if loose:
            raise DataError(
                f"{root}: unit='dir' needs every .txt file inside a sub-folder naming its unit; "
                f"{len(loose)} file(s) lie directly in the folder (e.g. {loose[0]})"
            )
    for path in files:
        rel = path.relative_to(root)
        text = _read_text(path, skips)
        if text is None:
            continue
        # unit "file": files with the same stem in different sub-folders share a unit (the
        # conservative direction: a larger group, never a split one).
        key = path.stem if unit == "file" else rel.parts[0]
        rec = _make(key, text, rel.as_posix(), skips)
        if rec is not None:
            yield rec


class _Undecodable:
    """Marker row for a line that was not valid UTF-8."""


def _jsonl_rows(path: Path) -> Iterator[Mapping[str, Any] | _Undecodable]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield _Undecodable()
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {lineno} is not a JSON object")
            yield row


def _csv_rows(path: Path, delimiter: str) -> Iterator[Mapping[str, Any]]:
    # surrogateescape keeps undecodable bytes as lone surrogates; _make skips those rows.
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        yield from reader


def _table(
    source: str,
    rows: Iterable[Mapping[str, Any] | _Undecodable],
    unit: str | None,
    text_column: str,
    skips: _Skips,
    columns: list[str] | None = None,
) -> Iterator[Record]:
    checked = False
    for i, row in enumerate(rows):
        if isinstance(row, _Undecodable):
            skips.add("undecodable")
            continue
        if not checked:
            cols = columns if columns is not None else list(row.keys())
            unit = _resolve_unit_column(source, unit, cols)
            if text_column not in cols:
                raise DataError(
                    f"{source}: text column {text_column!r} not found; available columns: {', '.join(map(str, cols))}"
                )
            checked = True
        doc_id = row.get("doc_id", row.get("id"))
        doc_id = str(i) if doc_id is None or doc_id == "" else str(doc_id)
        key = doc_id if unit == "row" else row.get(unit)
        if isinstance(key, str) and _has_surrogates(key):
            skips.add("undecodable")
            continue
        rec = _make(key, row.get(text_column), doc_id, skips)
        if rec is not None:
            yield rec


def _resolve_unit_column(source: str, unit: str | None, cols: list[str]) -> str:
    if unit == "row":
        return unit
    if unit is None:
        if "unit" in cols:
            return "unit"
        raise DataError(
            f"{source}: pass unit=COLUMN naming the privacy-unit column (or unit='row' to make "
            f"every row its own unit); available columns: {', '.join(map(str, cols))}"
        )
    if unit not in cols:
        raise DataError(
            f"{source}: unit column {unit!r} not found; available columns: {', '.join(map(str, cols))}"
        )
    return unit


# ---------------------------------------------------------------------------------------------
# hf:


def _hf_records(
    source: str, unit: str | None, text_column: str, split: str, skips: _Skips
) -> Iterator[Record]:
    spec = source.removeprefix("hf:")
    name, _, config = spec.partition(":")
    if not name:
        raise DataError(f"{source}: expected hf:NAME or hf:NAME:CONFIG")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source}: loading Hugging Face datasets needs the 'datasets' package (pip install 'pmixed[train]')"
        ) from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # offline, unknown name, bad config or split...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " (HF_HUB_OFFLINE is set: the hub is not contacted)" if offline else ""
        raise DataError(
            f"could not load Hugging Face dataset {name!r}"
            + (f" config {config!r}" if config else "")
            + f" split {split!r}{hint}: {type(err).__name__}: {reason[:300]}"
        ) from None
    return _table(source, iter(ds), unit, text_column, skips, columns=list(ds.column_names))
