"""`pmixed privacy plan`: the paper's setting, JSON output, and one-line errors naming the field."""

import json
import subprocess
import sys

import pytest

PAPER = ["--epsilon", "8", "--delta", "1e-5", "--queries", "1024", "--ensemble-size", "80", "--sample-rate", "0.03"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "pmixed.cli", "privacy", "plan", *args],
                          capture_output=True, text=True)


def test_paper_setting_json():
    out = run(*PAPER, "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["epsilon_after_queries"] <= 8.0
    assert d["expected_members_per_query"] == pytest.approx(2.4)
    assert d["chosen_order"] >= 2
    assert set(d["radius_per_order"]) == {str(k) for k in range(2, d["max_enforced_order"] + 1)}
    assert d["max_queries_within_target"] == 1024


def test_paper_setting_table_and_max_queries():
    out = run(*PAPER)
    assert out.returncode == 0 and "epsilon after 1024 queries" in out.stdout
    out = run(*PAPER, "--max-queries")
    assert out.returncode == 0 and out.stdout.startswith("1024 queries fit")
    out = run(*[a if a != "1024" else "100" for a in PAPER], "--max-queries", "--alpha", "3")
    assert out.returncode == 0


@pytest.mark.parametrize(
    "flag,value,field",
    [
        ("--epsilon", "0", "epsilon"),
        ("--delta", "1", "delta"),
        ("--delta", "0", "delta"),
        ("--sample-rate", "0", "sample-rate"),
        ("--sample-rate", "1.2", "sample-rate"),
        ("--ensemble-size", "0", "ensemble-size"),
        ("--alpha", "1", "alpha"),
    ],
)
def test_invalid_input_one_line(flag, value, field):
    args = list(PAPER)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    out = run(*args)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], out.stderr
