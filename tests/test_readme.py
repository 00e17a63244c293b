"""The README's code blocks run as written (issue 12 item 9).

Every fenced ``python``, ``bash``/``sh`` and ``console`` block runs, unless the line just before
its fence is ``<!-- readme-test: skip (REASON) -->`` with a non-empty reason. Python blocks run in
a fresh directory; ``console`` blocks run each ``$ pmixed ...`` command from the project root and
compare its output with the lines that follow it (trailing spaces and blank lines ignored).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"<!-- readme-test: skip \((.+)\) -->")
RUN = ("python", "bash", "sh", "console")


def blocks() -> list[tuple[int, str, str, str | None]]:
    """(line number, language, body, skip reason) of every fenced block with a language."""
    lines = README.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w+)\s*$", lines[i])
        if m:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            skip = SKIP.fullmatch(lines[i - 1].strip()) if i else None
            out.append((i + 1, m.group(1), "\n".join(lines[i + 1 : j]), skip.group(1) if skip else None))
            i = j
        i += 1
    return out


RUNNABLE = [b for b in blocks() if b[1] in RUN and b[3] is None]


def _env():
    return {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_every_block_runs_or_says_why_not():
    langs = {b[1] for b in blocks()}
    assert langs <= {*RUN, "toml", "text"}, langs
    assert any(b[1] == "python" for b in RUNNABLE) and any(b[1] == "console" for b in RUNNABLE)
    for line, lang, _, reason in blocks():
        assert reason is None or reason.strip(), f"README line {line}: a skipped {lang} block needs a reason"


@pytest.mark.parametrize("line,lang,body", [b[:3] for b in RUNNABLE], ids=[f"line{b[0]}-{b[1]}" for b in RUNNABLE])
def test_block_runs_as_written(line, lang, body, tmp_path):
    if lang == "python":
        out = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, capture_output=True, text=True, env=_env())
        assert out.returncode == 0, f"README line {line}:\n{out.stderr}"
    elif lang in ("bash", "sh"):
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=ROOT, capture_output=True, text=True,
                             env=_env())
        assert out.returncode == 0, f"README line {line}:\n{out.stderr}"
    else:
        commands: list[tuple[str, list[str]]] = []
        for text in body.splitlines():
            if text.startswith("$ "):
                commands.append((text[2:], []))
            elif text.strip():
                commands[-1][1].append(text.rstrip())
        assert commands, f"README line {line}: a console block without a $ command"
        for cmd, expected in commands:
            argv = shlex.split(cmd)
            assert argv[0] == "pmixed", f"README line {line}: only pmixed commands run here"
            out = subprocess.run([sys.executable, "-m", "pmixed", *argv[1:]], cwd=ROOT, capture_output=True,
                                 text=True, env=_env())
            assert out.returncode == 0, f"README line {line}: {cmd}\n{out.stderr}"
            got = [x.rstrip() for x in out.stdout.splitlines() if x.strip()]
            assert got == expected, f"README line {line}: {cmd} prints\n" + "\n".join(got)
