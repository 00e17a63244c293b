"""`pmixed eval` / `pmixed sweep` with the screened mechanism (docs/privacy.md section 11) on the
tiny trained run: what the screen sends where, what the filter charges, and the CLI."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from pmixed.privacy.ledger import Ledger


@pytest.fixture
def own_sweep_files(trained_run):
    """The shared trained run's sweep folder is shared with tests/eval/test_evaluation.py: remove
    the files these tests add (and restore the ones they replace), whatever the test order."""
    cfg, _ = trained_run
    folder = cfg.output_dir / "sweep"
    before = {p: p.read_bytes() for p in folder.glob("*")} if folder.is_dir() else {}
    yield
    for p in list(folder.glob("*")) if folder.is_dir() else []:
        if p not in before:
            p.unlink()
    for p, data in before.items():
        p.write_bytes(data)


def _adaptive(cfg, **privacy):
    return dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, mechanism="adaptive", **privacy))


def test_a_screen_that_never_fires_releases_the_public_model_for_one_unit(trained_run, tmp_path):
    from pmixed.eval.runner import evaluate_config

    cfg, _ = trained_run
    res = evaluate_config(_adaptive(cfg, screen_threshold=1e9, private_queries=5), out_dir=tmp_path, progress=False)
    plain, ad = res["pmixed"]
    assert ad["mechanism"] == "adaptive" and plain.get("mechanism", "pmixed") == "pmixed"
    assert ad["private_fraction"] == 0.0 and ad["units_per_session"] == 1.0  # one round, never closed
    assert math.isclose(ad["ppl_mean"], res["models"]["public"]["ppl"], rel_tol=1e-12)
    ledgers = sorted((cfg.output_dir / "ledgers" / "eval").glob("adaptive*.ledger"))
    assert len(ledgers) == 2
    for path in ledgers:
        with Ledger(path) as led:
            assert led.rule.name == f"renyi-filter/alpha={ad['filter_order']}"
            assert led.charges() == 1 and led.history()[0].mechanism == "pmixed/adaptive"
    assert "screened PMixED" in (tmp_path / "eval.md").read_text()


def test_a_screen_that_always_fires_stops_at_the_filter(trained_run, tmp_path):
    from pmixed.eval.runner import evaluate_config

    cfg, _ = trained_run
    res = evaluate_config(_adaptive(cfg, screen_threshold=-1e9, private_queries=10), out_dir=tmp_path, progress=False)
    ad = res["pmixed"][1]
    # every query private until the filter refuses: as many units as fit (>= 10), then p_0
    assert ad["units_per_session"] >= 10 and ad["queries_before_stop"] == ad["units_per_session"] < 93
    assert ad["epsilon_spent"] <= 8.0
    assert ad["private_fraction"] == pytest.approx(ad["units_per_session"] / 93)


def test_sweep_of_a_screen_parameter_needs_the_adaptive_mechanism(trained_run, tmp_path, own_sweep_files):
    cfg, cfg_path = trained_run
    out = subprocess.run([sys.executable, "-m", "pmixed", "sweep", "-c", str(cfg_path), "-o", str(tmp_path / "x"),
                          "-p", "screen_threshold", "-q"], capture_output=True, text=True)
    assert out.returncode == 2 and "--mechanism adaptive" in out.stderr, out.stderr
    assert not (tmp_path / "x").exists()
    out = subprocess.run([sys.executable, "-m", "pmixed", "sweep", "-c", str(cfg_path), "--mechanism", "adaptive",
                          "-p", "screen_threshold", "--values", "0,1e9", "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads((cfg.output_dir / "sweep" / "sweep-screen_threshold.json").read_text())
    fractions = [s["private_fraction"] for s in res["pmixed"]]
    assert fractions[0] > 0.0 and fractions[1] == 0.0
    out = subprocess.run([sys.executable, "-m", "pmixed", "eval", "-c", str(cfg_path), "-o", str(tmp_path / "y"),
                          "--mechanism", "bogus", "-q"], capture_output=True, text=True)
    assert out.returncode == 2 and "privacy.mechanism" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_adaptive_sweep_compares_with_plain_pmixed(trained_run, tmp_path, own_sweep_files):
    import csv

    cfg, cfg_path = trained_run
    out = subprocess.run([sys.executable, "-m", "pmixed", "sweep", "-c", str(cfg_path), "--mechanism", "adaptive",
                          "-p", "epsilon", "--values", "4,8", "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with (cfg.output_dir / "sweep" / "sweep-epsilon.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["mechanism"], float(r["value"])) for r in rows) == [
        ("adaptive", 4.0), ("adaptive", 8.0), ("pmixed", 4.0), ("pmixed", 8.0)]
    assert (cfg.output_dir / "sweep" / "sweep-epsilon.png").is_file()
