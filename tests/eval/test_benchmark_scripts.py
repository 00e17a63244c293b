"""Smoke tests of the study benchmarks (adaptive_gain, default_rule, crossover, tuning, cap_tuning,
loo_divergence) on the tiny trained run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"_pmixed_benchmarks_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_adaptive_gain_writes_the_comparison(trained_run, tmp_path):
    _, cfg_path = trained_run
    assert _bench("adaptive_gain").main(["--config", str(cfg_path), "--runs", "1", "--queries", "64",
                                         "--out", str(tmp_path)]) == 0
    d = json.loads((tmp_path / "adaptive.json").read_text())
    mechs = {r["mechanism"] for r in d["rows"]}
    assert {"pmixed", "adaptive", "oracle"} <= mechs
    assert all(0 <= r["private_fraction"] <= 1 for r in d["rows"])
    assert (tmp_path / "adaptive.png").stat().st_size > 0 and "gain share" in (tmp_path / "adaptive.md").read_text()


def test_default_rule_picks_by_mean_relative_share(monkeypatch, trained_run, tmp_path):
    mod = _bench("default_rule")
    studies = [{"grid": {"a": 0.5, "b": 0.4, "c": 0.1}}, {"grid": {"a": 0.1, "b": 0.3, "c": 0.3}}]
    assert mod.pick(studies) == "b"  # (0.8 + 1.0) / 2 beats a's (1.0 + 0.33) / 2 and c's
    # the study itself on a small grid
    monkeypatch.setattr(mod, "TAILS", (1.0, 10.0))
    monkeypatch.setattr(mod, "LAM_MAX", (0.5,))
    monkeypatch.setattr(mod, "ALPHAS", (None,))
    monkeypatch.setattr(mod, "MEMBERS", (2.4,))
    _, cfg_path = trained_run
    assert mod.main(["--config", str(cfg_path), "--config", str(cfg_path), "--runs", "1", "--queries", "64",
                     "--out", str(tmp_path)]) == 0
    d = json.loads((tmp_path / "loco.json").read_text())
    assert len(d["studies"]) == 2 and set(d["studies"][0]["grid"]) == {
        "tail=1 lam_max=0.5 alpha=auto m=2.4", "tail=10 lam_max=0.5 alpha=auto m=2.4"}
    assert d["rule"] in d["studies"][0]["grid"] and "left-out corpus" in (tmp_path / "loco.md").read_text()
    # the same config twice: one group of twins; the tables redone from the JSON alone
    assert [w["corpora"] for w in d["worst_case"]][1:] == [[d["studies"][0]["corpus"]] * 2]
    assert mod.main(["--from", str(tmp_path / "loco.json"), "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "loco.json").read_text())["loco"] == d["loco"]


def test_default_rule_worst_case_and_public_twins():
    mod = _bench("default_rule")
    studies = [{"grid": {"a": 0.5, "b": 0.45, "c": 0.1}}, {"grid": {"a": 0.1, "b": 0.27, "c": 0.3}}]
    assert mod.best_worst_case(studies) == ("b", pytest.approx(0.9))  # min(0.9, 0.9) beats a's 0.33, c's 0.2
    root = Path(__file__).resolve().parents[2] / "configs"
    key = {name: mod.public_constants(str(root / f"{name}.toml")) for name in ("quick", "quick-mail", "quick-president",
                                                                                "quick-moby")}
    assert key["quick"] == key["quick-mail"]  # only the private data differ: no public rule tells them apart
    assert len({key["quick"], key["quick-president"], key["quick-moby"]}) == 3  # N = 8; 3 epochs


def test_crossover_last_above_stops_at_the_first_drop():
    mod = _bench("crossover")
    pts = [(1024, 0.5), (2048, 0.4), (4096, 0.2), (8192, 0.35)]
    assert mod.last_above(pts, 0.3) == 2048  # the leading run only: a later rebound is noise
    assert mod.last_above(pts, 0.6) is None
    assert mod.last_above(pts, 0.1) == 8192


def test_crossover_scores_sessions_longer_than_the_held_out_positions(trained_run, tmp_path):
    _, cfg_path = trained_run
    assert _bench("crossover").main(["--config", str(cfg_path), "--runs", "1", "--queries", "64,100000",
                                     "--out", str(tmp_path)]) == 0
    d = json.loads((tmp_path / "crossover.json").read_text())
    Q = d["positions"]
    assert Q < 100000
    long = [r for r in d["rows"] if r["queries"] == 100000]
    assert {r["mechanism"] for r in long} == {"pmixed", "adaptive"}
    assert all(r["positions"] == Q for r in d["rows"])  # every point on the same positions
    plain = {r["queries"]: r["gain_share"] for r in d["rows"] if r["mechanism"] == "pmixed"}
    assert plain[100000] < plain[64]  # a budget spread over more queries keeps less
    assert set(d["summary"]) == {"plain", "public screen f=0.5", "public screen f=0.25"}
    assert (tmp_path / "crossover.png").stat().st_size > 0


def test_tuning_benchmark_compares_the_tuner_with_the_rule(monkeypatch, trained_run, tmp_path):
    mod = _bench("tuning")
    monkeypatch.setattr(mod, "SETTINGS", ({"per_unit": 2, "score_epsilon": 1.0, "eta": 1.0, "gamma": 0.5},
                                          {"per_unit": 10_000, "score_epsilon": 1.0, "eta": 1.0, "gamma": 0.01}))
    _, cfg_path = trained_run
    assert mod.main(["--config", str(cfg_path), "--repeats", "2", "--runs", "1", "--out", str(tmp_path)]) == 0
    d = json.loads((tmp_path / "tuning.json").read_text())
    ok, infeasible = d["studies"][0]["settings"]
    assert "infeasible" in infeasible  # a tuning no order can pay for is reported, not run
    assert sum(ok["picks"].values()) == 2 and 0 < ok["tuning_epsilon"] < 8
    want = sum(ok["paid"][k] * n for k, n in ok["picks"].items()) / 2  # the repeats' mean after paying
    assert ok["tuned_share"] == pytest.approx(want) and set(ok["paid"]) == set(ok["free"]) == set(ok["labels"])
    assert "after paying" in (tmp_path / "tuning.md").read_text()


def test_cap_tuning_benchmark_compares_the_tuner_with_the_rule(trained_run, tmp_path):
    _, cfg_path = trained_run
    assert _bench("cap_tuning").main(["--config", str(cfg_path), "--repeats", "5", "--runs", "1", "--public-blocks",
                                      "2", "--score-epsilon", "0.5", "--out", str(tmp_path)]) == 0
    d = json.loads((tmp_path / "cap_tuning.json").read_text())
    (e,) = d["studies"][0]["per_score_epsilon"]
    assert sum(e["picks"].values()) == 5 and set(e["picks"]) == set(e["paid"]) == {"0.25", "0.5", "0.75"}
    assert 0 < e["tuning_epsilon"] < 1 and 0 <= e["cap_share_nonprivate"] <= 1
    want = sum(e["paid"][k] * n for k, n in e["picks"].items()) / 5  # the repeats' mean after paying
    assert e["tuned_share"] == pytest.approx(want)
    assert "tuned, after paying" in (tmp_path / "cap_tuning.md").read_text()


def test_loo_divergence_never_exceeds_the_charge_on_real_outputs(trained_run, tmp_path):
    """The diagnostic's realised divergence (one neighbour: a part emptied) is bounded by the
    charge (R3) at every query and every claimed order: an end-to-end check of the bound on a
    trained ensemble's outputs."""
    import math

    mod = _bench("loo_divergence")
    assert mod.member_weight(1, 0.3) == pytest.approx(0.3)  # alone: in the draw with probability q
    for n, q in ((5, 0.5), (32, 0.03)):  # P[S empty] + N w = 1
        assert (1 - q) ** n + n * mod.member_weight(n, q) == pytest.approx(1.0)
    _, cfg_path = trained_run
    assert mod.main(["--config", str(cfg_path), "--out", str(tmp_path)]) == 0
    d = json.loads((tmp_path / "loo.json").read_text())
    assert "NOT a differential-privacy guarantee" in d["note"]
    claimed = [(a, c / d["T"], m) for a, c, m in zip(d["orders"], d["charged_rdp"], d["realised_max_per_query"])
               if math.isfinite(c)]
    assert claimed and all(0 <= m <= c for _, c, m in claimed)
    assert 0 < d["epsilon_realised_not_dp"] < d["epsilon_charged"]
