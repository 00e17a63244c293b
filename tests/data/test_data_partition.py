"""Partitioning by privacy unit: disjointness, determinism, balance, errors, manifests."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmixed.data.partition import (
    manifest_sha256,
    partition_by_unit,
    read_manifest,
    texts_sha256,
    write_manifest,
)
from pmixed.data.records import Record
from pmixed.errors import ConfigError, DataError


def make_records(assignment: list[tuple[str, int]]) -> list[Record]:
    """One record per (unit, length) pair; texts are unique."""
    return [
        Record(unit=u, text=f"{i}:" + "x" * n, doc_id=str(i)) for i, (u, n) in enumerate(assignment)
    ]


def unit_sets(p):
    return [{r.unit for r in part} for part in p.parts], {r.unit for r in p.eval_records}


records_strategy = st.lists(
    st.tuples(st.sampled_from([f"u{i}" for i in range(30)]), st.integers(0, 50)),
    min_size=1,
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(
    assignment=records_strategy,
    n_parts=st.integers(1, 8),
    eval_units=st.one_of(st.integers(0, 4), st.floats(0.0, 0.5)),
    seed=st.integers(0, 2**32),
)
def test_partition_is_disjoint_complete_and_deterministic(assignment, n_parts, eval_units, seed):
    records = make_records(assignment)
    n_units = len({u for u, _ in assignment})
    try:
        p = partition_by_unit(records, n_parts, seed=seed, eval_units=eval_units)
    except DataError as err:
        assert "too few privacy units" in str(err)
        assert f"has {n_units} unit" in str(err)
        return
    parts_units, eval_set = unit_sets(p)
    # disjoint: no unit in two parts, eval units in no part
    seen: set[str] = set()
    for units in parts_units:
        assert units, "every part has at least one unit"
        assert not (units & seen)
        assert not (units & eval_set)
        seen |= units
    # complete: every record is somewhere exactly once
    placed = [r for part in p.parts for r in part] + list(p.eval_records)
    assert sorted(placed, key=lambda r: r.doc_id) == sorted(records, key=lambda r: r.doc_id)
    # held-out count
    if isinstance(eval_units, int):
        assert len(eval_set) == eval_units
    elif eval_units > 0:
        assert len(eval_set) >= 1
    else:
        assert not eval_set
    # deterministic, and independent of the input order of the records
    again = partition_by_unit(records, n_parts, seed=seed, eval_units=eval_units)
    assert again.parts == p.parts and again.eval_records == p.eval_records
    assert again.manifest == p.manifest
    shuffled = records[:]
    random.Random(seed).shuffle(shuffled)
    other = partition_by_unit(shuffled, n_parts, seed=seed, eval_units=eval_units)
    assert unit_sets(other) == unit_sets(p)
    # manifest agrees with the parts
    m = p.manifest
    assert m["disjoint"] is True and m["n_parts"] == n_parts
    for idx, part in enumerate(p.parts):
        assert set(m["parts"][idx]["units"]) == parts_units[idx]
        assert m["parts"][idx]["n_records"] == len(part)
        assert m["parts"][idx]["sha256"] == texts_sha256(part)
        for u in parts_units[idx]:
            assert m["units"][u] == idx
    for u in eval_set:
        assert m["units"][u] == "eval"


def test_records_of_a_unit_stay_together_and_in_order():
    records = make_records([("a", 3), ("b", 3), ("a", 4), ("c", 1), ("a", 5), ("b", 2)])
    p = partition_by_unit(records, 3, eval_units=0)
    for part in p.parts:
        units = {r.unit for r in part}
        assert len(units) == 1
        (u,) = units
        assert [r.doc_id for r in part] == [r.doc_id for r in records if r.unit == u]


def test_eval_units_never_in_any_part_and_change_with_seed():
    records = make_records([(f"u{i}", 10) for i in range(40)])
    evals = set()
    for seed in range(5):
        p = partition_by_unit(records, 4, seed=seed, eval_units=0.1)
        parts_units, eval_set = unit_sets(p)
        assert len(eval_set) == 4
        assert all(not (units & eval_set) for units in parts_units)
        evals.add(frozenset(eval_set))
    assert len(evals) > 1


def test_balance_by_size():
    rng = random.Random(0)
    records = make_records([(f"u{i}", rng.randint(50, 150)) for i in range(200)])
    p = partition_by_unit(records, 8, seed=3, eval_units=10)
    sizes = [m["size"] for m in p.manifest["parts"]]
    assert max(sizes) / min(sizes) < 1.1
    # the LPT bound: max - min <= the largest unit
    assert max(sizes) - min(sizes) <= max(len(r.text) for r in records)


def test_size_fn_is_used():
    records = make_records([("big", 1), ("s1", 100), ("s2", 100), ("s3", 100)])
    # by size_fn, "big" weighs as much as the three others together
    p = partition_by_unit(
        records, 2, eval_units=0, size_fn=lambda r: 300 if r.unit == "big" else 100
    )
    parts_units, _ = unit_sets(p)
    assert {"big"} in parts_units
    assert sorted(m["size"] for m in p.manifest["parts"]) == [300, 300]


def test_zero_size_units_still_fill_every_part():
    records = make_records([(f"u{i}", 0) for i in range(6)])
    p = partition_by_unit(records, 3, eval_units=0, size_fn=lambda r: 0)
    assert [len(part) for part in p.parts] == [2, 2, 2]


def test_too_few_units_error_says_how_many():
    records = make_records([("a", 1), ("b", 1), ("c", 1)])
    with pytest.raises(DataError) as err:
        partition_by_unit(records, 3, eval_units=1, unit_key="sender")
    msg = str(err.value)
    assert (
        "3 units" in msg
        and "at least 4" in msg
        and "sender" in msg
        and "3 parts + 1 evaluation unit" in msg
    )
    partition_by_unit(records, 3, eval_units=0)  # exactly enough


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_parts": 0}, "n_parts"),
        ({"n_parts": True}, "n_parts"),
        ({"n_parts": 2, "eval_units": -1}, "eval_units"),
        ({"n_parts": 2, "eval_units": 1.0}, "eval_units"),
        ({"n_parts": 2, "eval_units": "3"}, "eval_units"),
    ],
)
def test_bad_parameters(kwargs, field):
    records = make_records([(f"u{i}", 1) for i in range(10)])
    n_parts = kwargs.pop("n_parts")
    with pytest.raises(ConfigError) as err:
        partition_by_unit(records, n_parts, **kwargs)
    assert err.value.field == field


def test_manifest_roundtrip_and_hash(tmp_path):
    records = make_records([(f"u{i}", i) for i in range(12)])
    p = partition_by_unit(records, 3, seed=7, eval_units=2, unit_key="user")
    path = tmp_path / "sub" / "partition.json"
    digest = write_manifest(p, path)
    back = read_manifest(path)
    assert back == json.loads(json.dumps(p.manifest))
    assert digest == manifest_sha256(back) == manifest_sha256(p.manifest)
    assert (
        back["format"] == "pmixed-partition/1" and back["unit_key"] == "user" and back["seed"] == 7
    )
    assert set(back["eval"]) >= {"units", "n_records", "size", "sha256"}
    assert set(back["parts"][0]) >= {"index", "units", "n_records", "size", "sha256"}
    # the hash is of content, not formatting, and changes with content
    other = dict(back, seed=8)
    assert manifest_sha256(other) != digest


def _tampered(tmp_path, mutate):
    records = make_records([(f"u{i}", i) for i in range(12)])
    manifest = json.loads(json.dumps(partition_by_unit(records, 3, eval_units=2).manifest))
    mutate(manifest)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(manifest))
    return path


def test_read_manifest_rejects_a_unit_in_two_parts(tmp_path):
    def mutate(m):
        m["parts"][1]["units"].append(m["parts"][0]["units"][0])

    with pytest.raises(DataError, match="not disjoint.*part 0 and in part 1"):
        read_manifest(_tampered(tmp_path, mutate))


def test_read_manifest_rejects_a_unit_in_a_part_and_eval(tmp_path):
    def mutate(m):
        m["eval"]["units"].append(m["parts"][2]["units"][0])

    with pytest.raises(DataError, match="not disjoint.*evaluation set"):
        read_manifest(_tampered(tmp_path, mutate))


def test_read_manifest_rejects_inconsistent_map_and_format(tmp_path):
    def remap(m):
        u = m["parts"][0]["units"][0]
        m["units"][u] = 1

    with pytest.raises(DataError, match="disagrees"):
        read_manifest(_tampered(tmp_path, remap))
    with pytest.raises(DataError, match="format"):
        read_manifest(_tampered(tmp_path, lambda m: m.update(format="other/1")))
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DataError, match="not readable JSON"):
        read_manifest(tmp_path / "junk.json")
