"""Usage errors are one line on stderr and exit 2 (the CLI framework's convention), never a
traceback; ``--version`` exists (issue 12 item 2)."""

import subprocess
import sys

import pytest

from pmixed import __version__

PLAN = ["privacy", "plan", "--delta", "1e-5", "--queries", "8", "--ensemble-size", "4", "--sample-rate", "0.5"]


def pmixed(*args):
    return subprocess.run([sys.executable, "-m", "pmixed", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args,says",
    [
        ((), "missing command"),
        (("frobnicate",), "frobnicate"),
        (("eval",), "--config"),
        (("privacy",), "missing command"),
        (("generate", "-c", "configs/quick.toml", "--max-new-tokens", "0"), "--max-new-tokens"),
        (("generate", "-c", "configs/quick.toml", "--temperature", "0"), "--temperature"),
        (("generate", "-c", "configs/quick.toml", "--temperature", "0.7"), "not covered by the privacy guarantee"),
        ((*PLAN, "--epsilon", "abc"), "--epsilon"),
    ],
)
def test_usage_error_is_one_line_exit_2(args, says):
    out = pmixed(*args)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], out.stderr


def test_version():
    out = pmixed("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"pmixed {__version__}", out
