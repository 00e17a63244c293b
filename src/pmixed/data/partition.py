"""Splitting records into N disjoint parts *by privacy unit*, before any tokenising or chunking.

The privacy guarantee protects a whole part; it protects a user (author, sender...) as a group
only if all of that unit's records are in one part. So: group the records by unit, hold out some
units for evaluation (they are in no part), and deal the remaining units out to the N parts,
balancing their sizes. Nothing here looks at tokens.

The manifest (``pmixed-partition/1``) records which unit went where and hashes each part's texts,
so that an ensemble can later prove which data each member saw and that the parts were disjoint.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmixed.data.records import Record
from pmixed.errors import ConfigError, DataError

FORMAT = "pmixed-partition/1"


@dataclass(frozen=True)
class Partition:
    parts: tuple[tuple[Record, ...], ...]  # N disjoint parts, by unit
    eval_records: tuple[Record, ...]  # records of held-out units, in no part
    manifest: dict  # JSON-ready, see module docstring and partition_by_unit

    @property
    def n_parts(self) -> int:
        return len(self.parts)


def texts_sha256(records: Iterable[Record]) -> str:
    """sha256 of the records' texts in order; each text is UTF-8, prefixed by its byte length
    and a colon (so that text boundaries are part of the hash)."""
    h = hashlib.sha256()
    for rec in records:
        data = rec.text.encode("utf-8")
        h.update(f"{len(data)}:".encode("ascii"))
        h.update(data)
    return h.hexdigest()


def _n_eval(eval_units: int | float, n_units: int) -> int:
    if isinstance(eval_units, bool) or not isinstance(eval_units, int | float):
        raise ConfigError(
            "eval_units", f"must be an int count or a float fraction, got {eval_units!r}"
        )
    if isinstance(eval_units, int):
        if eval_units < 0:
            raise ConfigError("eval_units", f"must be >= 0, got {eval_units}")
        return eval_units
    if not (0.0 <= eval_units < 1.0) or math.isnan(eval_units):
        raise ConfigError("eval_units", f"a fraction must lie in [0, 1), got {eval_units}")
    if eval_units == 0.0:
        return 0
    return max(1, round(eval_units * n_units))


def partition_by_unit(
    records: Iterable[Record],
    n_parts: int,
    *,
    seed: int = 0,
    eval_units: int | float = 0.1,
    size_fn: Callable[[Record], int] | None = None,
    unit_key: str | None = None,
) -> Partition:
    """Split ``records`` into ``n_parts`` disjoint parts by unit, plus held-out evaluation units.

    1. Group records by ``unit`` (a unit's records keep their input order).
    2. Shuffle the sorted unit names with ``random.Random(seed)``; the first ``n_eval`` units are
       held out for evaluation (``eval_units``: an int count, or a fraction of the units rounded
       and at least 1 when > 0).
    3. Deal the other units largest-first (``size_fn(record)`` summed over the unit; default
       ``len(record.text)``; equal sizes keep the shuffled order) into the part that is currently
       smallest (then: fewest units, then lowest index). This is the LPT rule: the largest and
       the smallest part differ by at most the size of the largest single unit.

    The result depends only on the records (not their order across units), ``n_parts``, ``seed``,
    ``eval_units`` and ``size_fn``. ``unit_key`` (e.g. "sender") is only written to the manifest.
    Raises :class:`DataError` when there are fewer units than ``n_parts`` + evaluation units.
    """
    if isinstance(n_parts, bool) or not isinstance(n_parts, int) or n_parts < 1:
        raise ConfigError("n_parts", f"must be a positive integer, got {n_parts!r}")
    size_of = size_fn if size_fn is not None else (lambda r: len(r.text))
    by_unit: dict[str, list[Record]] = {}
    for rec in records:
        if not isinstance(rec, Record):
            raise DataError(f"partition_by_unit expects Record objects, got {type(rec).__name__}")
        by_unit.setdefault(rec.unit, []).append(rec)
    n_units = len(by_unit)
    n_eval = _n_eval(eval_units, n_units)
    needed = n_parts + n_eval
    if n_units < needed:
        what = f"{n_parts} parts" + (
            f" + {n_eval} evaluation unit{'s' if n_eval != 1 else ''}" if n_eval else ""
        )
        raise DataError(
            f"too few privacy units{f' ({unit_key})' if unit_key else ''}: the data has {n_units} "
            f"unit{'s' if n_units != 1 else ''}, but {what} need at least {needed} "
            "(each part needs at least one unit of its own)"
        )

    order = sorted(by_unit)
    random.Random(seed).shuffle(order)
    eval_set = order[:n_eval]
    rest = order[n_eval:]
    unit_size = {u: sum(int(size_of(r)) for r in by_unit[u]) for u in rest}
    for u, s in unit_size.items():
        if s < 0:
            raise DataError(f"size_fn returned a negative size for unit {u!r}")
    rank = {u: i for i, u in enumerate(rest)}
    dealing = sorted(rest, key=lambda u: (-unit_size[u], rank[u]))

    heap = [(0, 0, i) for i in range(n_parts)]  # (size, n_units, index)
    part_units: list[list[str]] = [[] for _ in range(n_parts)]
    for u in dealing:
        size, count, idx = heapq.heappop(heap)
        part_units[idx].append(u)
        heapq.heappush(heap, (size + unit_size[u], count + 1, idx))

    parts = tuple(tuple(r for u in units for r in by_unit[u]) for units in part_units)
    eval_records = tuple(r for u in eval_set for r in by_unit[u])

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "seed": seed,
        "n_parts": n_parts,
    }
    if unit_key is not None:
        manifest["unit_key"] = unit_key
    manifest["size_measure"] = (
        "characters" if size_fn is None else getattr(size_fn, "__name__", "size_fn")
    )
    units_map: dict[str, int | str] = {}
    for idx, units in enumerate(part_units):
        for u in units:
            units_map[u] = idx
    for u in eval_set:
        units_map[u] = "eval"
    manifest["units"] = dict(sorted(units_map.items()))
    manifest["parts"] = [
        {
            "index": idx,
            "units": list(units),
            "n_records": len(parts[idx]),
            "size": sum(unit_size[u] for u in units),
            "sha256": texts_sha256(parts[idx]),
        }
        for idx, units in enumerate(part_units)
    ]
    manifest["eval"] = {
        "units": list(eval_set),
        "n_records": len(eval_records),
        "size": sum(int(size_of(r)) for r in eval_records),
        "sha256": texts_sha256(eval_records),
    }
    manifest["disjoint"] = True
    _check_disjoint(manifest)  # cheap, and the manifest must never claim what is false
    return Partition(parts=parts, eval_records=eval_records, manifest=manifest)


# ---------------------------------------------------------------------------------------------
# Manifest I/O


def _canonical(manifest: dict) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace, UTF-8) of ``manifest``."""
    return hashlib.sha256(_canonical(manifest)).hexdigest()


def write_manifest(partition: Partition, path: str | os.PathLike[str]) -> str:
    """Write the manifest as (indented, sorted-key) JSON, atomically; return
    ``manifest_sha256(manifest)``, which equals ``manifest_sha256(read_manifest(path))``:
    the hash is of the canonical form, independent of the file's whitespace."""
    manifest = partition.manifest
    _check_disjoint(manifest)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return manifest_sha256(manifest)


def read_manifest(path: str | os.PathLike[str]) -> dict:
    """Read a partition manifest and re-check it: the format, the part indices, and that no unit
    is in two parts or in a part and in the evaluation set. Raises :class:`DataError`."""
    try:
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"partition manifest {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"partition manifest {path} is not readable JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"partition manifest {path}: expected format {FORMAT!r}, got {got!r}")
    try:
        _check_disjoint(manifest)
    except DataError as err:
        raise DataError(f"partition manifest {path}: {err}") from None
    return manifest


def _check_disjoint(manifest: dict) -> None:
    for key in ("n_parts", "units", "parts", "eval", "disjoint"):
        if key not in manifest:
            raise DataError(f"manifest lacks {key!r}")
    parts = manifest["parts"]
    if not isinstance(parts, list) or len(parts) != manifest["n_parts"]:
        raise DataError(
            f"manifest has {len(parts) if isinstance(parts, list) else '?'} parts, n_parts says {manifest['n_parts']}"
        )
    owner: dict[str, int | str] = {}

    def claim(unit: str, where: int | str) -> None:
        if unit in owner:
            a, b = owner[unit], where
            raise DataError(f"not disjoint: unit {unit!r} is in {_where(a)} and in {_where(b)}")
        owner[unit] = where

    for pos, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("index") != pos:
            raise DataError(
                f"part at position {pos} has index {part.get('index') if isinstance(part, dict) else '?'}"
            )
        units = part.get("units")
        if not isinstance(units, list) or not units:
            raise DataError(f"part {pos} lists no units")
        for u in units:
            claim(u, pos)
    ev = manifest["eval"]
    if not isinstance(ev, dict) or not isinstance(ev.get("units"), list):
        raise DataError("manifest 'eval' lacks its unit list")
    for u in ev["units"]:
        claim(u, "eval")
    umap = manifest["units"]
    if not isinstance(umap, dict) or umap != owner:
        extra = sorted(set(umap) ^ set(owner)) if isinstance(umap, dict) else []
        diff = [u for u in owner if isinstance(umap, dict) and u in umap and umap[u] != owner[u]]
        raise DataError(
            "the 'units' map disagrees with the part and eval lists"
            + (f" (units only on one side: {extra[:5]})" if extra else "")
            + (
                f" (unit {diff[0]!r} is mapped to {umap[diff[0]]!r} but listed in {_where(owner[diff[0]])})"
                if diff
                else ""
            )
        )
    if manifest["disjoint"] is not True:
        raise DataError("manifest does not claim disjoint parts")


def _where(x: int | str) -> str:
    return "the evaluation set" if x == "eval" else f"part {x}"


def part_texts(partition: Partition, index: int) -> list[str]:
    """The texts of one part, in order (what :func:`pmixed.data.blocks.tokenize_blocks` takes)."""
    return [r.text for r in partition.parts[index]]


def units_of(records: Sequence[Record]) -> list[str]:
    """The distinct units of ``records`` in first-appearance order."""
    return list(dict.fromkeys(r.unit for r in records))
