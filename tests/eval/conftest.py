from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny base, a 3-member ensemble and both baselines, with a config file for the CLI."""
    from pmixed.config import load_config
    from pmixed.train.dpsgd import train_dpsgd
    from pmixed.train.ensemble import train_ensemble
    from pmixed.train.finetune import train_finetune
    from tests.train.helpers import build_tiny_base, tiny_config_dict, write_records, write_toml

    root = tmp_path_factory.mktemp("evalrun")
    base = build_tiny_base(root / "base")
    records = write_records(root / "records.jsonl", n_units=10, per_unit=6)
    data = tiny_config_dict(base, records, root / "out", n_parts=3,
                            train__max_steps=8, lora__dropout=0.0)
    data["privacy"] = {"epsilon": 8.0, "delta": 1e-5, "queries": 93, "sample_rate": 0.5}
    data["eval"] = {"runs": 2, "n_blocks": 3, "block_size": 32, "seed": 0}
    cfg_path = write_toml(data, root / "tiny.toml")
    cfg = load_config(cfg_path)
    train_ensemble(cfg, progress=False)
    train_finetune(cfg, progress=False)
    train_dpsgd(cfg, progress=False)
    return cfg, cfg_path
