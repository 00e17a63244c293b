"""The accounted tuner's math (privacy/tuning.py, eqs. (H1)-(H3)) and the calibration on top of a
spent curve (docs/privacy.md section 12). The exact tests are tests/exact/test_exact_tuning.py."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmixed.errors import ConfigError
from pmixed.privacy.accountant import DEFAULT_ORDERS
from pmixed.privacy.calibration import calibrate, epsilon_after, scale_of
from pmixed.privacy.conversion import rdp_to_epsilon
from pmixed.privacy.ledger import Ledger
from pmixed.privacy.mixture_bound import query_rdp
from pmixed.privacy.tuning import (
    MECHANISM,
    TuneParams,
    expected_trials,
    laplace_rdp,
    repeated_rdp,
    sample_trials,
    trials_pmf,
    tune_from_record,
    tuning_charge,
)


def _cands(alpha=4):
    return tuple(calibrate(epsilon=8.0, delta=1e-5, query_budget=1024, ensemble_size=32, sample_rate=0.5,
                           alpha=alpha, lam_max=lm, tail=t).params for lm, t in ((0.5, 10.0), (0.75, 3.0)))


def test_pinned_laplace_rdp():
    # (H1) at a = 2, e = 1: log(2/3 e + 1/3 e^-2) (Mironov 2017, Prop. 6), by hand 0.619124
    assert laplace_rdp(2, 1.0) == pytest.approx(math.log(2 / 3 * math.e + 1 / 3 * math.exp(-2)), rel=1e-11)
    assert laplace_rdp(2, 1.0) == pytest.approx(0.6191236, abs=1e-7)
    assert laplace_rdp(math.inf, 0.7) == 0.7  # pure DP at the limit
    assert laplace_rdp(1000.0, 0.7) <= 0.7
    with pytest.raises(ConfigError, match="score_epsilon"):
        laplace_rdp(2, 0.0)


@given(st.floats(1.01, 200.0), st.floats(1.01, 200.0), st.floats(0.01, 20.0))
@settings(max_examples=200, deadline=None)
def test_laplace_rdp_grows_with_the_order_and_never_exceeds_pure_epsilon(a, b, e):
    lo, hi = sorted((a, b))
    assert laplace_rdp(lo, e) <= laplace_rdp(hi, e) * (1 + 1e-9)
    assert laplace_rdp(hi, e) <= e


def test_pinned_trial_count_laws():
    assert expected_trials(1.0, 0.1) == pytest.approx(10.0)  # geometric: 1 / gamma
    assert expected_trials(0.0, 0.2) == pytest.approx(4 / math.log(5))  # logarithmic: (1/g - 1) / log(1/g)
    assert trials_pmf(1, 1.0, 0.25) == pytest.approx(0.25)  # geometric: gamma (1 - gamma)^(k - 1)
    assert trials_pmf(3, 1.0, 0.25) == pytest.approx(0.25 * 0.75**2)
    assert trials_pmf(0, 1.0, 0.25) == 0.0
    for eta, gamma in ((1.0, 0.1), (0.0, 0.3), (2.0, 0.2), (-0.5, 0.05)):
        assert sum(trials_pmf(k, eta, gamma) for k in range(1, 5000)) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ConfigError, match="gamma"):
        expected_trials(1.0, 1.0)
    with pytest.raises(ConfigError, match="eta"):
        expected_trials(-1.0, 0.5)


@pytest.mark.parametrize("eta,gamma", [(1.0, 0.2), (0.0, 0.3), (-0.5, 0.1)])
def test_sampling_by_inversion_follows_the_law(eta, gamma):
    n = 20_000  # the quantiles (i + 0.5) / n: the counts match the pmf to within one per value
    counts: dict[int, int] = {}
    for i in range(n):
        k = sample_trials((i + 0.5) / n, eta, gamma)
        counts[k] = counts.get(k, 0) + 1
    for k in range(1, 8):
        assert abs(counts.get(k, 0) - n * trials_pmf(k, eta, gamma)) <= 1.5
    with pytest.raises(ValueError):
        sample_trials(1.0, eta, gamma)


def test_repeated_rdp_is_the_formula_with_the_best_second_order():
    trial = {2.0: 0.1, 3.0: 0.2, 4.0: 0.5}
    eta, gamma = 1.0, 0.5
    extra = min((1 + eta) * (1 - 1 / b) * eb + (1 + eta) * math.log(1 / gamma) / b for b, eb in trial.items())
    want = 0.2 + extra + math.log(expected_trials(eta, gamma)) / 2
    assert repeated_rdp(3.0, trial, eta, gamma) == pytest.approx(want, rel=1e-11)
    assert repeated_rdp(3.0, trial, eta, gamma) >= want  # rounded up, never down
    assert repeated_rdp(5.0, trial, eta, gamma) == math.inf  # no claim at an order the trial lacks


@given(st.lists(st.floats(0.0, 5.0), min_size=3, max_size=3), st.floats(-0.9, 3.0), st.floats(0.01, 0.99))
@settings(max_examples=200, deadline=None)
def test_repetition_never_costs_less_than_one_trial(vals, eta, gamma):
    trial = dict(zip((2.0, 4.0, 8.0), vals))
    for a, e in trial.items():
        assert repeated_rdp(a, trial, eta, gamma) >= e


def test_the_trial_takes_the_worst_candidate_and_the_larger_of_both_neighbour_kinds():
    cands = _cands()
    p = TuneParams(cands, units=10, per_unit=4, score_epsilon=0.5, eta=1.0, gamma=0.5)
    assert p.positions == 40
    for a in (2, 3, 4):
        q = max(query_rdp(a, c) for c in cands)
        assert p.trial_rdp(a) == max(40 * q, laplace_rdp(a, 0.5))
    assert p.trial_rdp(5) == math.inf  # beyond the candidates' order K = 4: no claim
    few = TuneParams(cands, units=1, per_unit=1, score_epsilon=5.0)
    assert few.trial_rdp(2) == laplace_rdp(2, 5.0)  # one query: the held-out side dominates


def test_bad_tuner_parameters_name_their_field():
    cands = _cands()
    with pytest.raises(ConfigError, match="positions_per_unit"):
        TuneParams(cands, 4, 0, 1.0)
    with pytest.raises(ConfigError, match="units"):
        TuneParams(cands, 0, 4, 1.0)
    with pytest.raises(ConfigError, match="score_epsilon"):
        TuneParams(cands, 4, 4, -1.0)
    with pytest.raises(ConfigError, match="candidates"):
        TuneParams((), 4, 4, 1.0)
    other_n = calibrate(epsilon=8.0, delta=1e-5, query_budget=1024, ensemble_size=16, sample_rate=0.5).params
    with pytest.raises(ConfigError, match="same ensemble"):
        TuneParams(cands + (other_n,), 4, 4, 1.0)


def test_the_charge_is_recorded_and_replays(tmp_path):
    p = TuneParams(_cands(), units=4, per_unit=8, score_epsilon=1.0, eta=1.0, gamma=0.5)
    c = tuning_charge(p)
    assert c.mechanism == MECHANISM and c.count == 1 and c.orders == DEFAULT_ORDERS
    assert c.rdp == p.curve(DEFAULT_ORDERS)
    assert tuning_charge(tune_from_record(c.params)).rdp == c.rdp  # an auditor recomputes it
    with Ledger(tmp_path / "t.ledger", epsilon=8.0, delta=1e-5) as led:
        led.charge(c)
        assert led.history()[-1].mechanism == MECHANISM
        assert led.epsilon_spent() == pytest.approx(rdp_to_epsilon(DEFAULT_ORDERS, c.rdp, 1e-5)[0])


def test_calibration_on_top_of_a_spent_curve_meets_the_target_with_everything():
    kw = dict(epsilon=8.0, delta=1e-5, query_budget=1024, ensemble_size=32, sample_rate=0.5, alpha=4,
              lam_max=0.5, tail=10.0)
    alone = calibrate(**kw)
    tune = TuneParams(_cands(), units=4, per_unit=8, score_epsilon=1.0, eta=1.0, gamma=0.5)
    spent = dict(zip(DEFAULT_ORDERS, tune.curve(DEFAULT_ORDERS)))
    after = calibrate(**kw, spent=spent)
    assert scale_of(after.params) < scale_of(alone.params)  # the tuning is paid from the same budget
    assert epsilon_after(after.params, 1024, 1e-5, spent) <= 8.0
    assert epsilon_after(alone.params, 1024, 1e-5, spent) > 8.0  # ignoring the tuning would overshoot
    # on a spent curve the T queries fit at the order alpha itself (the serving filter's order):
    # exactly, with the largest scale; never more room than the best order would give
    from pmixed.privacy.conversion import rdp_budget

    assert after.alpha == after.params.max_order == 4
    used = spent[4.0] + 1024 * query_rdp(4, after.params)
    assert used <= rdp_budget(8.0, 1e-5, 4) and used == pytest.approx(rdp_budget(8.0, 1e-5, 4), rel=1e-6)
    zero = calibrate(**kw, spent={a: 0.0 for a in DEFAULT_ORDERS})
    assert scale_of(zero.params) <= scale_of(alone.params) * (1 + 1e-9)
    assert 1024 * query_rdp(4, zero.params) == pytest.approx(rdp_budget(8.0, 1e-5, 4), rel=1e-6)
    with pytest.raises(ConfigError, match="epsilon"):
        calibrate(**{**kw, "alpha": None}, spent={a: 100.0 for a in DEFAULT_ORDERS})


@given(st.floats(0.0, 1.5))
@settings(max_examples=30, deadline=None)
def test_calibration_after_spending_never_overshoots(rho):
    kw = dict(epsilon=8.0, delta=1e-5, query_budget=512, ensemble_size=16, sample_rate=0.5, lam_max=0.5, tail=10.0)
    spent = {a: rho * a / 4 for a in DEFAULT_ORDERS}
    try:
        cal = calibrate(**kw, spent=spent)
    except ConfigError:
        return
    assert epsilon_after(cal.params, 512, 1e-5, spent) <= 8.0


# --- the cap-statistic tuner, eq. (H4) --------------------------------------------------------

def _bind(eps_s=0.25, n=32):
    from pmixed.privacy.tuning import BindParams

    ref = calibrate(epsilon=8.0, delta=1e-5, query_budget=1024, ensemble_size=n, sample_rate=0.5).params
    return BindParams(n, 1016, eps_s, ref)


def test_the_cap_statistic_costs_one_laplace_release_of_sensitivity_one_over_n():
    p = _bind(0.25)
    assert p.noise_scale == pytest.approx(1 / (32 * 0.25))  # Lap(1 / (N eps_s)): the mean moves by <= 1/N
    assert p.curve(DEFAULT_ORDERS) == tuple(laplace_rdp(a, 0.25) for a in DEFAULT_ORDERS)
    # pinned (eq. (H1) at eps 0.25): the whole tuning is cheap next to the trials' 3.9-6.8
    assert rdp_to_epsilon(DEFAULT_ORDERS, p.curve(DEFAULT_ORDERS), 1e-5)[0] == pytest.approx(0.2668, abs=1e-3)
    assert p.caps == (0.25, 0.5, 0.75)  # low, the reference's (the rule's), high
    assert [p.choose(x) for x in (-3.0, 0.1666, 1 / 6, 0.7999, 0.8, 2.0)] == [0.25, 0.25, 0.5, 0.5, 0.75, 0.75]


def test_the_cap_statistic_charge_is_recorded_replays_and_is_paid_once(tmp_path):
    from pmixed.privacy.tuning import (
        BIND_MECHANISM,
        bind_charge,
        bind_from_record,
        charge_from_record,
        pay_tuning,
    )

    p = _bind()
    c = bind_charge(p)
    assert c.mechanism == BIND_MECHANISM and c.count == 1 and c.params["method"] == "bind"
    assert bind_from_record(c.params) == p
    assert charge_from_record(c.params).rdp == c.rdp  # either tuner replays from its record
    trials = TuneParams(_cands(), units=4, per_unit=8, score_epsilon=1.0, eta=1.0, gamma=0.5)
    assert charge_from_record(trials.record()).mechanism == MECHANISM
    with Ledger(tmp_path / "t.ledger", epsilon=8.0, delta=1e-5) as led:
        assert pay_tuning(led, p.record()) is False  # charged now
        assert pay_tuning(led, p.record()) is True  # found, not charged again
        assert [h.mechanism for h in led.history()] == [BIND_MECHANISM]
        assert pay_tuning(led, _bind(0.5).record()) is False  # another tuning is another charge
        assert len(led.history()) == 2
        again = _bind()  # a second run with the same options: another private selection
        assert again.record() != p.record() and bind_from_record(again.record()) == again
        assert pay_tuning(led, again.record()) is False  # not taken for the first run's charge
        legacy = {k: v for k, v in p.record().items() if k != "run"}  # a record from before run ids
        assert pay_tuning(led, legacy) is False  # cannot be told from another run: charged again
        assert pay_tuning(led, again.record()) is True
        assert len(led.history()) == 4
        with pytest.raises(ConfigError, match="identity"):
            dataclasses.replace(p, run="")


def test_bad_cap_statistic_parameters_name_their_field():
    from pmixed.privacy.tuning import BindParams

    ref = _bind().reference
    for kw, field in (({"score_epsilon": 0.0}, "score_epsilon"), ({"positions": 0}, "public_positions"),
                      ({"ensemble_size": 16}, "same ensemble"), ({"upper": 1.0}, "thresholds"),
                      ({"lower": 0.9}, "thresholds"),
                      ({"low": 0.0}, "low"), ({"high": 1.5}, "high")):
        args = {"ensemble_size": 32, "positions": 10, "score_epsilon": 0.25, "reference": ref, **kw}
        with pytest.raises(ConfigError, match=field):
            BindParams(**args)


def test_candidates_at_their_own_best_orders_overspend_jointly():
    """Why every candidate is calibrated at one order, and a tuned shape is served under the Renyi
    filter there: the served cost depends on the tuning's output, so the whole interaction is
    bounded, at one order, by the tuning plus the worst branch. Two shapes each calibrated at its
    own best order (4 and 3) certify epsilon 8.43 > 8 jointly (the unsound variant); calibrated at
    one common order, the joint curve stays within 8 at that order."""
    spent = {a: laplace_rdp(a, 0.5) for a in DEFAULT_ORDERS}
    kw = dict(epsilon=8.0, delta=1e-5, query_budget=1024, ensemble_size=32, sample_rate=0.5, spent=spent)

    def joint(cals):
        curve = [spent[a] + 1024 * max(query_rdp(a, c.params) for c in cals) for a in DEFAULT_ORDERS]
        return rdp_to_epsilon(DEFAULT_ORDERS, curve, 1e-5)[0]

    own = [calibrate(alpha=None, lam_max=0.25, tail=t, **kw) for t in (1.0, 10.0)]
    assert sorted(c.alpha for c in own) == [3, 4]
    assert joint(own) > 8.4  # each branch alone is within 8: the union is not
    common = [calibrate(alpha=3, lam_max=0.25, tail=t, **kw) for t in (1.0, 10.0)]
    assert joint(common) <= 8.0 * (1 + 1e-9)


def test_a_tuned_mechanism_needs_the_filter_at_its_order():
    from pmixed.errors import LedgerError
    from pmixed.mechanism.pmixed import PMixED
    from pmixed.privacy.acceptance import BEST_ORDER, RenyiFilterRule
    from pmixed.privacy.accountant import RdpAccountant

    spent = {a: laplace_rdp(a, 0.5) for a in DEFAULT_ORDERS}
    mech = PMixED(epsilon=8.0, delta=1e-5, query_budget=1024, ensemble_size=32, sample_rate=0.5, spent=spent)
    with pytest.raises(LedgerError, match=f"renyi-filter/alpha={mech.alpha}"):
        mech.check_rule(RdpAccountant(epsilon=8.0, delta=1e-5, rule=BEST_ORDER))
    with pytest.raises(LedgerError):
        mech.check_rule(RdpAccountant(epsilon=8.0, delta=1e-5, rule=RenyiFilterRule(mech.alpha + 1)))
    mech.check_rule(RdpAccountant(epsilon=8.0, delta=1e-5, rule=RenyiFilterRule(mech.alpha)))
    mech.check_rule(RdpAccountant(epsilon=8.0, delta=1e-5, rule=mech.rule))  # what to open a budget with
    untuned = PMixED(epsilon=8.0, delta=1e-5, query_budget=1024, ensemble_size=32, sample_rate=0.5)
    untuned.check_rule(RdpAccountant(epsilon=8.0, delta=1e-5, rule=BEST_ORDER))  # fixed costs: any rule
    assert untuned.rule == BEST_ORDER
