from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from tests.train.helpers import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def tiny_records(tmp_path_factory) -> Path:
    from tests.train.helpers import write_records

    return write_records(tmp_path_factory.mktemp("records") / "records.jsonl")
