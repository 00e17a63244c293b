"""`pmixed tune` on the tiny trained run: the tuning set (held-out units, m positions each), the
trial's law, the charge before any trial, and the CLI's refusals (docs/privacy.md section 12)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pmixed.cli import main
from pmixed.errors import BudgetExhausted, ConfigError
from pmixed.eval import tuning as tuning_mod
from pmixed.eval.runner import load_runtime
from pmixed.eval.tuning import (
    candidates,
    plan,
    run_trial,
    serving_calibration,
    tune,
    tuning_stats,
    unit_blocks,
)
from pmixed.mechanism.teacher_forcing import released_target_probs
from pmixed.privacy.calibration import epsilon_after
from pmixed.privacy.conversion import rdp_to_epsilon
from pmixed.privacy.ledger import MEMORY, Ledger
from pmixed.privacy.tuning import tuning_charge


def _cli(capsys, *args: str) -> tuple[int, str]:
    """``pmixed`` in-process through its entry point: (exit code, stdout + stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as ex:
        code = ex.code or 0
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture(scope="module")
def tuned(trained_run):
    cfg, cfg_path = trained_run
    ens, rt = load_runtime(cfg, progress=False)
    blocks = unit_blocks(ens, cfg.eval.block_size)
    return cfg, cfg_path, ens, rt, blocks


def test_one_block_per_held_out_unit_and_only_its_last_m_positions(tuned):
    cfg, _, ens, rt, blocks = tuned
    units = {r.unit for r in ens.eval_records()}
    assert len(blocks) == len(units) and all(1 <= b.shape[0] <= cfg.eval.block_size for b in blocks)
    assert all(b.shape[0] <= 5 for b in unit_blocks(ens, cfg.eval.block_size, context=5))  # never past the context
    stats = tuning_stats(rt, blocks, per_unit=3, max_order=4)
    for st, pos in stats:
        T = st.public_target.shape[0]
        assert pos.tolist() == list(range(max(0, T - 3), T))
        computed = ~torch.isnan(st.moments[:, 0, 0])
        assert computed[pos].all() and not computed[: T - 3].any()  # the context positions are not queried


def test_a_trial_counts_hits_with_the_released_law(tuned):
    """E[hits] = the sum of the released probabilities of the targets (one PMixED answer per position,
    the sampled token compared with the target); eps_s huge makes the noise negligible."""
    cfg, _, _, rt, blocks = tuned
    cand = candidates(cfg, (10.0,), (0.5,), alpha=4)[0]
    stats = tuning_stats(rt, blocks, per_unit=4, max_order=4)
    g = torch.Generator().manual_seed(0)
    n = 400
    mean = sum(run_trial(stats, cand, 1e9, 4, g) for _ in range(n)) / n
    # the expectation over the draws as well: average the released probabilities over many draws
    params = cand.calibration.params
    want = 0.0
    for _ in range(200):
        for st, pos in stats:
            mask = torch.zeros(st.public_target.shape[0], params.ensemble_size, dtype=torch.bool)
            mask[pos] = torch.rand(len(pos), params.ensemble_size, generator=g) < params.sample_rate
            want += float(released_target_probs(st, mask, params)[0][pos].sum()) / 200
    total = sum(len(pos) for _, pos in stats)
    assert abs(mean - want) < 4 * math.sqrt(total / 4 / n) + 0.05


def test_the_tuning_is_charged_before_any_trial_and_refused_whole(tuned, monkeypatch):
    cfg, _, _, rt, blocks = tuned
    cands, params = plan(cfg, len(blocks), 4, 1.0, 1.0, 0.5, (1.0, 10.0), (0.5,))
    led = Ledger(MEMORY, epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta)
    seen = []
    real = tuning_mod.run_trial

    def spy(*a, **k):
        seen.append(led.epsilon_spent())
        return real(*a, **k)

    monkeypatch.setattr(tuning_mod, "run_trial", spy)
    res = tune(rt, blocks, cands, params, led, generator=torch.Generator().manual_seed(1))
    charge = tuning_charge(params, led.orders)
    assert seen and all(s == pytest.approx(rdp_to_epsilon(led.orders, charge.rdp, led.delta)[0]) for s in seen)
    assert res.chosen in cands and res.epsilon_spent == pytest.approx(seen[0])
    assert [h.mechanism for h in led.history()] == ["tune/pmixed"]
    # the serving calibration after it fits what is left, tuning included
    after = serving_calibration(cfg, res.chosen, dict(zip(led.orders, led.spent_rdp())))
    assert epsilon_after(after.params, cfg.privacy.queries, cfg.privacy.delta,
                         dict(zip(led.orders, led.spent_rdp()))) <= cfg.privacy.epsilon
    # a ledger without room: refused before any trial or forward, nothing recorded
    small = Ledger(MEMORY, epsilon=0.5, delta=cfg.privacy.delta)
    seen.clear()
    monkeypatch.setattr(tuning_mod, "tuning_stats", lambda *a, **k: pytest.fail("ran a forward"))
    with pytest.raises(BudgetExhausted):
        tune(rt, blocks, cands, params, small)
    assert not seen and small.history() == [] and small.epsilon_spent() == 0.0


def test_the_plan_uses_one_order_for_every_candidate(tuned):
    cfg, _, _, _, blocks = tuned
    cands, params = plan(cfg, len(blocks), 4, 1.0, 1.0, 0.5)
    assert len({c.calibration.params.max_order for c in cands}) == 1
    assert len(cands) == 16
    with pytest.raises(ConfigError, match="tune"):
        plan(cfg, len(blocks), 10_000, 1.0, 1.0, 0.01)  # no order pays for this much tuning


def test_cli_tune_experiment_writes_the_choice(trained_run, capsys):
    cfg, cfg_path = trained_run
    code, out = _cli(capsys, "tune", "--method", "trials", "--config", str(cfg_path), "--experiment", "--seed", "0", "-q",
                     "--positions-per-unit", "4", "--gamma", "0.5", "--tails", "1,10", "--lam-max", "0.5")
    assert code == 0, out
    assert "chosen shape: tail =" in out and "epsilon spent now" in out
    rec = json.loads((cfg.output_dir / "tune" / "tune.json").read_text())
    assert rec["tail"] in (1.0, 10.0) and rec["lam_max"] == 0.5 and rec["experiment"] is True
    assert 0 < rec["epsilon_spent"] < cfg.privacy.epsilon


def test_cli_tune_refusals(trained_run, tmp_path, capsys):
    _, cfg_path = trained_run
    code, out = _cli(capsys, "tune", "--method", "trials", "--config", str(cfg_path), "--seed", "0")
    assert code == 2 and "--experiment" in out
    code, out = _cli(capsys, "tune", "--method", "trials", "--config", str(cfg_path), "--experiment", "--tails", "a,b")
    assert code == 2 and "tails" in out
    for args, field in ((["--gamma", "1.5"], "gamma"), (["--eta", "-2"], "eta"), (["--score-epsilon", "0"], "score_epsilon"),
                        (["--lam-max", "1.5"], "lam_max"), (["--tails", "0.5"], "tail")):
        code, out = _cli(capsys, "tune", "--method", "trials", "--config", str(cfg_path), "--experiment", *args)
        assert code == 2 and field in out and "Loading" not in out, (args, out)
    # an option the chosen method does not read is refused, not ignored
    for method, args in (("bind", ["--tails", "1,3"]), ("bind", ["--gamma", "0.5", "--eta", "1"]),
                         ("trials", ["--public-blocks", "4"])):
        code, out = _cli(capsys, "tune", "--method", method, "--config", str(cfg_path), "--experiment", *args)
        assert code == 2 and f"--method {method}" in out and args[0] in out and "Loading" not in out, (args, out)
    from pmixed.eval.tuning import held_out_units
    from pmixed.privacy.acceptance import RenyiFilterRule
    from pmixed.privacy.accountant import RdpCharge
    from pmixed.privacy.conversion import rdp_budget

    cfg = trained_run[0]
    cands, _ = plan(cfg, held_out_units(cfg), 4, 1.0, 1.0, 0.5)
    order = cands[0].calibration.params.max_order
    # a ledger of fixed costs (best-order rule) cannot carry a tuning: exit 4, nothing charged
    plain = tmp_path / "plain.ledger"
    with Ledger(plain, epsilon=8.0, delta=1e-5) as led:
        led.charge(RdpCharge(led.orders, tuple(0.1 for _ in led.orders), label="earlier"))
    code, out = _cli(capsys, "tune", "--method", "trials", "--config", str(cfg_path), "--ledger", str(plain), "-q",
                     "--positions-per-unit", "4", "--gamma", "0.5")
    assert code == 4 and f"renyi-filter/alpha={order}" in out and "Loading" not in out, out
    with Ledger(plain) as led:
        assert len(led.history()) == 1
    # a durable ledger under the tuning's filter without room: exit 3, nothing charged
    path = tmp_path / "full.ledger"
    with Ledger(path, epsilon=8.0, delta=1e-5, rule=RenyiFilterRule(order)) as led:
        led.charge(RdpCharge(led.orders, tuple(0.0 if a != order else 0.95 * rdp_budget(8.0, 1e-5, order)
                                               for a in led.orders), label="spent"))
        before = led.epsilon_spent()
    code, out = _cli(capsys, "tune", "--method", "trials", "--config", str(cfg_path), "--ledger", str(path), "-q",
                     "--positions-per-unit", "4", "--gamma", "0.5")
    assert code == 3 and "privacy budget exhausted" in out and "tuning" in out, out
    with Ledger(path, epsilon=8.0, delta=1e-5) as led:
        assert led.epsilon_spent() == before and len(led.history()) == 1


def test_a_tuned_config_calibrates_in_what_the_tuning_left(trained_run, capsys, tmp_path):
    """privacy.tuning = tune.json: the shape from the file, the tuning's curve composed with the T
    queries (calibration, PMixED.from_config, the evaluation's ledgers), and the table says so."""
    import dataclasses

    from pmixed.eval.runner import config_setup
    from pmixed.mechanism.pmixed import PMixED

    cfg, cfg_path = trained_run
    code, out = _cli(capsys, "tune", "--method", "trials", "--config", str(cfg_path), "--experiment", "--seed", "1", "-q",
                     "--positions-per-unit", "4", "--gamma", "0.5", "--tails", "10", "--lam-max", "0.5")
    assert code == 0, out
    assert "tuning = " in out
    path = cfg.output_dir / "tune" / "tune.json"
    rec = json.loads(path.read_text())
    tuned = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, tuning=str(path)))
    kw = tuned.privacy.calibration_kwargs(cfg.data.n_parts)
    assert (kw["lam_max"], kw["tail"], kw["alpha"]) == (0.5, 10.0, rec["alpha"]) and kw["spent"]
    assert tuned.privacy.shape_source() == "accounted tuning"
    plain = PMixED.from_config(cfg.privacy, cfg.data.n_parts, lam_max=0.5, tail=10.0, alpha=rec["alpha"])
    paid = PMixED.from_config(tuned.privacy, cfg.data.n_parts)
    assert paid.params.radii[0] < plain.params.radii[0]  # the tuning is paid from the same budget
    assert epsilon_after(paid.params, cfg.privacy.queries, cfg.privacy.delta, kw["spent"]) <= cfg.privacy.epsilon
    # the evaluation's fresh ledgers pay the tuning first: spent = tuning + T queries, within epsilon
    from pmixed.eval.perplexity import run_evaluation

    ens, rt = load_runtime(cfg, progress=False)
    from pmixed.eval.runner import eval_blocks

    blocks = eval_blocks(ens, cfg)
    s_paid = config_setup(tuned, "tuned")
    s_free = config_setup(cfg, "free", lam_max=0.5, tail=10.0, alpha=rec["alpha"])
    res = run_evaluation(rt, blocks, [s_paid, s_free], progress=False, average=False)
    spent = {s["name"]: s["epsilon_spent"] for s in res.pmixed}
    assert spent["tuned"] <= cfg.privacy.epsilon and spent["tuned"] > spent["free"] * 0.99
    # bad links: one line naming the field
    with pytest.raises(ConfigError, match="privacy.tuning"):
        dataclasses.replace(cfg.privacy, tuning=str(path), tail=3.0)
    with pytest.raises(ConfigError, match="privacy.tuning"):
        dataclasses.replace(cfg.privacy, tuning=str(path), mechanism="adaptive")
    with pytest.raises(ConfigError, match="no such file"):
        dataclasses.replace(cfg.privacy, tuning=str(tmp_path / "none.json")).calibration_kwargs(3)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a tune.json"):
        dataclasses.replace(cfg.privacy, tuning=str(tmp_path / "bad.json")).calibration_kwargs(3)
    # tuning a tuned config again is refused (it would pay again, silently)
    tuned_toml = tmp_path / "tuned.toml"
    tuned_toml.write_text(cfg_path.read_text().replace("[privacy]", f"[privacy]\ntuning = \"{path}\"", 1))
    code, out = _cli(capsys, "tune", "--method", "trials", "--config", str(tuned_toml), "--experiment")
    assert code == 2 and "already takes its shape" in out


def _generate_twice(capsys, cfg_path, tune_json, tmp_path):
    """`pmixed generate` twice with ``privacy.tuning = tune_json`` on one fresh ledger: the first
    run says it charged the tuning, the second does not. Returns the ledger's path."""
    toml = tmp_path / "tuned.toml"
    toml.write_text(cfg_path.read_text().replace("[privacy]", f"[privacy]\ntuning = \"{tune_json}\"", 1))
    ledger = tmp_path / "serve.ledger"
    for first in (True, False):
        code, out = _cli(capsys, "generate", "-c", str(toml), "--prompt", "river", "--max-new-tokens", "2",
                         "--ledger", str(ledger), "-q", "--ignore-eos")
        assert code == 0, out
        assert ("charged now, before anything is served" in out) is first
    with Ledger(ledger) as led:  # the served cost depended on the tuning: a Renyi filter at its order
        assert led.rule.name == f"renyi-filter/alpha={json.loads(tune_json.read_text())['alpha']}"
    return ledger


def test_the_ledger_that_serves_a_tuned_shape_pays_the_tuning_once(trained_run, capsys, tmp_path):
    """privacy.tuning chosen on another (here: an experiment's in-memory) ledger: the first
    generation charges the tuning to its own ledger before any token, later ones find it there;
    a seeded tuning is refused outside an experiment (its choice is not a private release)."""
    from pmixed.privacy.tuning import MECHANISM, pay_tuning

    cfg, cfg_path = trained_run
    import shutil

    toml = tmp_path / "tuned.toml"  # written by _generate_twice
    code, out = _cli(capsys, "tune", "--method", "trials", "--config", str(cfg_path), "--experiment", "-q",
                     "--positions-per-unit", "2", "--tails", "10", "--lam-max", "0.5")  # unseeded: a real release
    assert code == 0, out
    tune_json = tmp_path / "tune.json"
    shutil.copy(cfg.output_dir / "tune" / "tune.json", tune_json)
    rec = json.loads(tune_json.read_text())
    assert rec["seeded"] is False and rec["experiment"] is True
    ledger = _generate_twice(capsys, cfg_path, tune_json, tmp_path)
    with Ledger(ledger) as led:
        hist = led.history()
        assert hist[0].mechanism == MECHANISM  # paid before the first token
        assert [h.mechanism for h in hist].count(MECHANISM) == 1  # and only once
        assert pay_tuning(led, rec["tuning"]) is True
    # a seeded tuning: refused for a durable ledger, before anything is charged
    code, out = _cli(capsys, "tune", "--method", "trials", "--config", str(cfg_path), "--experiment", "--seed", "3", "-q",
                     "--positions-per-unit", "2", "--tails", "10", "--lam-max", "0.5")
    assert code == 0, out
    shutil.copy(cfg.output_dir / "tune" / "tune.json", tune_json)
    other = tmp_path / "other.ledger"
    code, out = _cli(capsys, "generate", "-c", str(toml), "--prompt", "river", "--ledger", str(other), "-q")
    assert code == 2 and "--seed" in out and "not a private release" in out
    with Ledger(other) as led:
        assert led.history() == []


# --- the cap-statistic tuner (eq. (H4)) -------------------------------------------------------

def _stacks(rt):
    from pmixed.models.stacked_lora import StackedLoRALinear

    return [m for m in rt.stacked.modules() if isinstance(m, StackedLoRALinear)]


def test_public_positions_come_from_the_public_model_alone(tuned):
    """The positions depend on no member: the same texts with every adapter changed."""
    from pmixed.eval.tuning import public_blocks

    cfg, _, ens, rt, _ = tuned
    a = public_blocks(rt, 3, 12, 0)
    assert a.shape == (3, 12) and a.dtype == torch.long and (a[:, 0] == 0).all()
    saved = [m.lora_B.clone() for m in _stacks(rt)]
    try:
        for m in _stacks(rt):
            m.lora_B.normal_(0, 1.0)
        assert torch.equal(public_blocks(rt, 3, 12, 0), a)
    finally:
        for m, b in zip(_stacks(rt), saved):
            m.lora_B.copy_(b)
    with pytest.raises(ConfigError, match="public_blocks"):
        public_blocks(rt, 0, 12, 0)


def test_a_member_s_cap_share_reads_its_own_adapter_only(tuned):
    """The sensitivity 1/N of eq. (H4): changing member j's adapter (a part's change) moves b_j
    and no other b_i; every b_i lies in [0, 1]."""
    from pmixed.eval.tuning import bind_plan, cap_shares, public_blocks

    cfg, _, ens, rt, _ = tuned
    texts = public_blocks(rt, 2, 16, 0)
    params, _ = bind_plan(cfg, 2 * 15, 0.25)
    b = cap_shares(rt, texts, params.reference)
    assert b.shape == (rt.n_members,) and ((b >= 0) & (b <= 1)).all()
    j = 1
    saved = [m.lora_B.clone() for m in _stacks(rt)]
    try:
        for m in _stacks(rt):
            m.lora_B[j].mul_(0.0)  # member j becomes the public model: its mixing weight hits the cap
        b2 = cap_shares(rt, texts, params.reference)
    finally:
        for m, s in zip(_stacks(rt), saved):
            m.lora_B.copy_(s)
    others = [i for i in range(rt.n_members) if i != j]
    assert torch.equal(b2[others], b[others])
    assert b2[j] == 1.0  # a member equal to the public model is at the cap everywhere


def test_the_cap_statistic_is_charged_before_any_member_runs_and_refused_whole(tuned, monkeypatch):
    from pmixed.eval.tuning import bind_plan, public_blocks, tune_bind
    from pmixed.privacy.accountant import RdpCharge
    from pmixed.privacy.tuning import BIND_MECHANISM

    cfg, _, ens, rt, _ = tuned
    texts = public_blocks(rt, 2, 8, 0)
    params, cands = bind_plan(cfg, 2 * 7, 0.25)
    assert set(cands) == {0.25, 0.5, 0.75} and all(c.tail == 10.0 for c in cands.values())
    assert cands[0.5].calibration.params == params.reference  # the middle candidate is the reference itself
    assert {c.calibration.alpha for c in cands.values()} == {params.reference.max_order}  # one order for all
    calls = []
    monkeypatch.setattr(tuning_mod, "cap_shares", lambda *a, **k: calls.append(1) or torch.ones(rt.n_members))
    led = Ledger(MEMORY, epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta)
    led.charge(RdpCharge(led.orders, tuple(7.8 for _ in led.orders), label="spent"))  # nearly full
    with pytest.raises(BudgetExhausted):
        tune_bind(rt, texts, params, cands, led)
    assert calls == [] and len(led.history()) == 1  # nothing ran, nothing more recorded
    led = Ledger(MEMORY, epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta)
    res = tune_bind(rt, texts, params, cands, led, generator=torch.Generator().manual_seed(0))
    assert calls == [1] and [h.mechanism for h in led.history()] == [BIND_MECHANISM]
    assert res.chosen.lam_max == params.choose(res.released)
    with pytest.raises(ValueError, match="public positions"):
        tune_bind(rt, texts[:, :5], params, cands, led)


def test_cli_tune_bind_writes_a_choice_that_serves_and_is_paid_once(trained_run, capsys, tmp_path):
    """`pmixed tune` (the cap statistic, the default) -> tune.json -> privacy.tuning: the
    calibration pays the tuning's curve, and the serving ledger is charged "tune/bind" once."""
    import dataclasses
    import shutil

    from pmixed.privacy.tuning import BIND_MECHANISM, laplace_rdp, pay_tuning

    cfg, cfg_path = trained_run
    code, out = _cli(capsys, "tune", "--config", str(cfg_path), "--experiment", "-q", "--public-blocks", "2")
    assert code == 0, out
    assert "noisy cap share" in out and "eq. (H4)" in out
    tune_json = tmp_path / "tune.json"
    shutil.copy(cfg.output_dir / "tune" / "tune.json", tune_json)
    rec = json.loads(tune_json.read_text())
    assert rec["method"] == "bind" and rec["tail"] == 10.0 and rec["lam_max"] in (0.25, 0.5, 0.75)
    assert rec["spent"]["rdp"][1] == pytest.approx(laplace_rdp(rec["spent"]["orders"][1], 0.5))  # the default eps_s
    tuned_cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, tuning=str(tune_json)))
    kw = tuned_cfg.privacy.calibration_kwargs(cfg.data.n_parts)
    assert kw["lam_max"] == rec["lam_max"] and kw["spent"]
    ledger = _generate_twice(capsys, cfg_path, tune_json, tmp_path)
    with Ledger(ledger) as led:
        hist = led.history()
        assert hist[0].mechanism == BIND_MECHANISM and [h.mechanism for h in hist].count(BIND_MECHANISM) == 1
        assert pay_tuning(led, rec["tuning"]) is True
    code, out = _cli(capsys, "tune", "--config", str(cfg_path), "--experiment", "--method", "grid")
    assert code == 2 and "method" in out
