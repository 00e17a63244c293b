"""`pmixed privacy plan`: the paper's setting, JSON output, and one-line errors naming the field."""

import json
import math
import os
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
    d = json.loads(run(*PAPER, "--json").stdout)  # the default rule's shape (lam_max 0.5, tail 10): orders 2..3
    assert d["max_enforced_order"] == 3 and d["lam_max"] == 0.5 and d["tail"] == 10.0
    assert "ball enforced at orders 2..3 (--max-order" in out.stdout and "tail = 10" in out.stdout
    assert f"the RDP-to-DP conversion attains epsilon at order {d['chosen_order']}" in out.stdout
    # --max-queries answers for other targets, not echo T: fewer at a smaller epsilon, more at a larger
    out = run(*PAPER, "--max-queries", "--json")
    assert out.returncode == 0, out.stderr
    fits = {float(k): v for k, v in json.loads(out.stdout)["max_queries_at_epsilon"].items()}
    assert sorted(fits) == [2.0, 4.0, 8.0, 16.0] and fits[8.0] == 1024
    assert fits[4.0] < 1024 < fits[16.0]
    out = run(*[a if a != "1024" else "100" for a in PAPER], "--max-queries", "--alpha", "3", "--at-epsilon", "9")
    assert out.returncode == 0 and "epsilon 9:" in out.stdout
    n = int(out.stdout.split("epsilon 9:")[1].split()[0])
    assert n > 100


def test_max_order_is_not_the_conversion_order():
    """--max-order 5 enforces the ball at orders 2..5; the conversion may attain epsilon lower."""
    out = run(*PAPER, "--max-order", "5", "--json")
    d = json.loads(out.stdout)
    assert d["max_enforced_order"] == 5 and 2 <= d["chosen_order"] <= 5
    out = run(*PAPER, "--max-order", "5")
    assert "ball enforced at orders 2..5" in out.stdout
    assert f"attains epsilon at order {d['chosen_order']}" in out.stdout


def test_queries_is_required():
    out = run(*[a for a in PAPER if a not in ("--queries", "1024")])
    assert out.returncode == 2 and "Missing option '--queries'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = subprocess.run([sys.executable, "-m", "pmixed.cli", "privacy", "plan", "--help"], capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "200"})
    line = next(x for x in out.stdout.splitlines() if "--queries" in x)
    assert "required" in line


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


def status(*args):
    return subprocess.run([sys.executable, "-m", "pmixed.cli", "privacy", "status", *map(str, args)],
                          capture_output=True, text=True)


def test_status_refuses_a_missing_ledger_and_creates_none(tmp_path):
    out = status("--ledger", tmp_path / "none.ledger")
    assert out.returncode == 4 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "no ledger at" in out.stderr
    assert not (tmp_path / "none.ledger").exists()


def test_status_summarises_the_history(tmp_path):
    from pmixed.privacy.accountant import RdpCharge
    from pmixed.privacy.ledger import Ledger

    path = tmp_path / "b.ledger"
    with Ledger(path, epsilon=8.0, delta=1e-5) as led:
        rdp = [0.001] * len(led.orders)
        for count, label in ((3, "generate"), (1, "generate"), (10, "score")):
            led.charge(RdpCharge(led.orders, rdp, count=count, label=label))
        spent = led.epsilon_spent()
    out = status("--ledger", path, "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["charges"] == 3 and d["queries"] == 14 and d["epsilon_spent"] == spent
    assert d["by_label"] == {"generate": {"charges": 2, "refunds": 0, "queries": 4},
                             "score": {"charges": 1, "refunds": 0, "queries": 10}}
    assert d["epsilon_limit"] == 8.0 and math.isclose(d["epsilon_remaining"], 8.0 - spent)
    out = status("--ledger", path)
    assert "history: 3 charges, 14 queries (generate: 2 charges, 4 queries, score: 1 charges, 10 queries)" in out.stdout


def test_queries_left_is_the_largest_count_that_fits():
    from pmixed.cli.privacy import queries_left
    from pmixed.privacy.accountant import RdpCharge
    from pmixed.privacy.ledger import Ledger

    with Ledger(":memory:", epsilon=2.0, delta=1e-5) as led:
        rdp = [0.002 * a for a in led.orders]
        led.charge(RdpCharge(led.orders, rdp, count=7))
        k = queries_left(led, rdp)
        assert k > 0
        assert led.can_afford(RdpCharge(led.orders, rdp, count=k))
        assert not led.can_afford(RdpCharge(led.orders, rdp, count=k + 1))


def test_status_of_a_filter_ledger_counts_units(tmp_path):
    """A screened-PMixED ledger (Renyi filter rule): status names the rule and, with an adaptive
    config, counts the units left at its cost."""
    from pathlib import Path

    from pmixed.config import load_config
    from pmixed.mechanism.adaptive import AdaptivePMixED
    from pmixed.privacy.ledger import Ledger

    root = Path(__file__).resolve().parents[1]
    text = (root / "configs" / "quick.toml").read_text().replace(
        "[privacy]\n", '[privacy]\nmechanism = "adaptive"\nscreen_threshold = 5.0\nprivate_queries = 100\n')
    cfg_path = tmp_path / "adaptive.toml"
    cfg_path.write_text(text.replace('output_dir = "runs/quick"', f'output_dir = "{tmp_path / "run"}"'))
    cfg = load_config(cfg_path)
    mech = AdaptivePMixED.from_config(cfg.privacy, cfg.data.n_parts)
    path = tmp_path / "f.ledger"
    with Ledger(path, epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta, rule=mech.rule) as led:
        led.charge(mech.charge(led.orders))
        led.charge(mech.charge(led.orders))
        left = led.queries_left(mech.charge(led.orders).rdp)
    assert left == mech.max_units() - 2 >= 98
    out = status("--ledger", path, "--config", cfg_path)
    assert out.returncode == 0, out.stderr
    assert f"acceptance rule renyi-filter/alpha={mech.order}" in out.stdout
    assert f"units left under the Renyi filter at {cfg_path}'s cost" in out.stdout and out.stdout.strip().endswith(str(left))
