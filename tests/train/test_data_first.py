"""Defect 6 (issue 11): bad data stop training before the public base is pre-trained or loaded."""

from __future__ import annotations

import pytest

from pmixed.errors import DataError
from tests.train.helpers import tiny_config


def _entry(name: str):
    import importlib

    module, func = {
        "ensemble": ("pmixed.train.ensemble", "train_ensemble"),
        "finetune": ("pmixed.train.finetune", "train_finetune"),
        "dpsgd": ("pmixed.train.dpsgd", "train_dpsgd"),
        "dpsgd_unit": ("pmixed.train.dpsgd_unit", "train_dpsgd_unit"),
    }[name]
    return getattr(importlib.import_module(module), func)


@pytest.mark.parametrize("entry", ["ensemble", "finetune", "dpsgd", "dpsgd_unit"])
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"data__unit": "no_such_column"}, "no_such_column"),
        ({"n_parts": 10}, "too few privacy units"),  # 10 units < 10 parts + 1 evaluation unit
    ],
    ids=["missing-unit-column", "too-few-units"],
)
def test_bad_data_fail_fast_before_any_base_pretraining(
    entry, bad, message, tiny_records, tmp_path, monkeypatch
):
    import pmixed.models.builtins as builtins
    import pmixed.models.loading as loading
    import pmixed.train.public_pretrain as public_pretrain

    cache = tmp_path / "cache"  # empty: builtin:tiny-gpt2 would be pre-trained from scratch
    monkeypatch.setenv("PMIXED_CACHE", str(cache))
    calls: list[str] = []

    def must_not_run(what):
        def fail(*args, **kwargs):
            calls.append(what)
            raise AssertionError(f"{what} ran before the data were checked")

        return fail

    monkeypatch.setitem(builtins._BUILDERS, builtins.BUILTIN_TINY_GPT2, must_not_run("pre-training"))
    monkeypatch.setattr(public_pretrain, "pretrain_tiny_gpt2", must_not_run("pre-training"))
    monkeypatch.setattr(loading, "load_causal_lm", must_not_run("model loading"))
    bad = dict(bad)
    n_parts = bad.pop("n_parts", 3)
    cfg = tiny_config(
        "builtin:tiny-gpt2", tiny_records, tmp_path / "out", n_parts=n_parts, **bad
    )
    with pytest.raises(DataError, match=message):
        _entry(entry)(cfg, progress=False)
    assert calls == []
    assert not (cache / "models").exists()  # nothing pre-trained, nothing half-written
