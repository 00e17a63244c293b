"""Loading, cleaning, partitioning by privacy unit, and tokenising into blocks.

``records``, ``sources`` and ``partition`` import no torch; ``blocks`` does (import it directly:
``from pmixed.data.blocks import tokenize_blocks``).
"""

from pmixed.data.partition import (
    Partition,
    manifest_sha256,
    partition_by_unit,
    read_manifest,
    write_manifest,
)
from pmixed.data.records import Record
from pmixed.data.sources import load_records

__all__ = [
    "Partition",
    "Record",
    "load_records",
    "manifest_sha256",
    "partition_by_unit",
    "read_manifest",
    "write_manifest",
]
