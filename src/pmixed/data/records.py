"""The unit of data everything else works on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Record:
    """One document and the privacy unit it belongs to.

    ``unit`` is the thing a privacy guarantee protects as a whole (a user, an author, a
    president, a mail sender, a document); all records of one unit always land in the same part.
    ``doc_id`` is a stable id of the document within its source (a file name, a row index...).
    """

    unit: str  # the privacy unit (user, author, president, sender, document id)
    text: str
    doc_id: str  # stable id of the document within its source
