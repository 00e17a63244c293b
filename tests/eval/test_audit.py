"""The audit game (eval/audit.py, docs/privacy.md section 13): its simulation is of the library's
release (checked draw by draw, and a release that is not the mean of its members is caught), its
marginal is exact (enumeration of every draw), a calibrated mechanism stays under its claim
while the same mechanism without its ball is caught, and `pmixed audit` on a trained run."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from pmixed.eval import audit as audit_mod
from pmixed.eval.audit import (
    AuditMismatch,
    audit,
    candidate_tokens,
    choose_canary,
    marginal,
    position_rates,
    session_bits,
    unsound_control,
)
from pmixed.mechanism.release import release
from pmixed.privacy.calibration import calibrate, epsilon_after
from tests.eval.test_tuning import _cli


def _instance(T=24, N=6, V=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, V, generator=g) * 2
    public = torch.softmax(logits, -1)
    members = torch.softmax(logits[:, None] + torch.randn(T, N, V, generator=g), -1)  # [T, N, V]
    params = calibrate(epsilon=8.0, delta=1e-5, query_budget=1024, ensemble_size=N, sample_rate=0.5).params
    return public, members, params


def test_rates_are_the_release_of_one_member_and_the_canary_is_public():
    public, members, params = _instance()
    rates = position_rates(public, members, params, member=2, generator=torch.Generator().manual_seed(1))
    for t in (0, 5):
        y = int(rates.tokens[t])
        assert y in candidate_tokens(public[t]).tolist()
        assert (y, float(rates.canary[t]), float(rates.empty[t])) == choose_canary(public[t], params)  # p_0 alone decides
        assert float(rates.empty[t]) == pytest.approx(float(release(public[t], members[t, :0], params)[y]), abs=1e-15)
        assert float(rates.kept[t, 4]) == pytest.approx(float(release(public[t], members[t, 4:5], params)[y]), abs=1e-15)
        row = torch.zeros_like(public[t])
        row[y] = 1.0
        assert float(rates.canary[t]) == pytest.approx(float(release(public[t], row[None], params)[y]), abs=1e-15)
    a1 = rates.world(True)
    assert torch.equal(a1[:, 2], rates.canary) and torch.equal(a1[:, :2], rates.kept[:, :2])


def test_a_release_that_is_not_the_mean_of_its_members_is_caught(monkeypatch):
    public, members, params = _instance(T=3)

    def skewed(p0, rows, prm):  # the first drawn member counts twice: not eq. (M1)
        out = release(p0, rows, prm)
        if rows.shape[0] > 1:
            out = (out * rows.shape[0] + release(p0, rows[:1], prm)) / (rows.shape[0] + 1)
        return out

    monkeypatch.setattr(audit_mod, "release", skewed)
    with pytest.raises(AuditMismatch, match="release of .* mean of their single releases"):
        position_rates(public, members, params, generator=torch.Generator().manual_seed(0))
    monkeypatch.undo()
    real_masked = audit_mod.release_masked
    monkeypatch.setattr(audit_mod, "release_masked",  # constant-work serving's path, off by a draw-size term
                        lambda p0, rows, mask, prm: real_masked(p0, rows, mask, prm) * (1 + 1e-6 * int(mask.sum())))
    with pytest.raises(AuditMismatch, match="release_masked"):
        position_rates(public, members, params, generator=torch.Generator().manual_seed(0))


def test_marginal_is_exact_over_every_draw():
    N, q, T = 4, 0.3, 5
    g = torch.Generator().manual_seed(2)
    a = torch.rand(T, N, generator=g, dtype=torch.float64)
    empty = torch.rand(T, generator=g, dtype=torch.float64)
    want = torch.zeros(T, dtype=torch.float64)
    for bits in itertools.product([0, 1], repeat=N):
        k = sum(bits)
        w = q**k * (1 - q) ** (N - k)
        idx = [j for j in range(N) if bits[j]]
        want += w * (a[:, idx].mean(-1) if idx else empty)
    assert torch.allclose(marginal(a, empty, N, q), want, rtol=0, atol=1e-14)
    # and the simulated sessions have that rate (4 standard errors)
    bits = session_bits(a, empty, q, 20000, torch.Generator().manual_seed(3))
    se = (want * (1 - want) / 20000).sqrt()
    assert ((bits.double().mean(0) - want).abs() <= 4 * se + 1e-12).all()


def test_sound_mechanism_under_its_claim_and_the_unsound_control_caught():
    public, members, params = _instance(T=32, N=8, V=64)
    claim = epsilon_after(params, 32, 1e-5)
    g = torch.Generator().manual_seed(4)
    sound = audit(position_rates(public, members, params, generator=g), params, delta=1e-5,
                  epsilon_claimed=claim, sessions=4000, generator=g)
    assert not sound.violated and sound.epsilon_lower < 1.0
    bad = unsound_control(params)
    caught = audit(position_rates(public, members, bad, generator=g), bad, delta=1e-5,
                   epsilon_claimed=claim, sessions=4000, generator=g)
    assert caught.violated and caught.epsilon_lower > claim
    assert caught.epsilon_lower <= caught.ceiling and sound.ceiling == caught.ceiling
    rec = caught.record()
    assert rec["violated"] is True and rec["counts"][rec["direction"]]["n1"] == 2000


def test_cli_audit_on_a_trained_run(trained_run, capsys, monkeypatch):
    from pmixed.eval import runner

    cfg, cfg_path = trained_run
    checks = []
    real = runner.check_ensemble_matches
    monkeypatch.setattr(runner, "check_ensemble_matches", lambda c: checks.append(c) or real(c))
    code, out = _cli(capsys, "audit", "--config", str(cfg_path), "-q", "--sessions", "400", "--queries", "16")
    assert code == 0, out
    assert len(checks) == 1  # before the model loads, and not again inside load_runtime
    assert "consistent with the claim" in out and "control (deliberately unsound" in out
    rec = json.loads((cfg.output_dir / "audit" / "audit.json").read_text())
    assert rec["queries"] == 16 and rec["violated"] is False and rec["control"]["queries"] == 16
    assert rec["epsilon_claimed"] == pytest.approx(epsilon_after(
        calibrate(**cfg.privacy.calibration_kwargs(cfg.data.n_parts)).params, 16, cfg.privacy.delta))
    code, out = _cli(capsys, "audit", "--config", str(cfg_path), "--member", "3")
    assert code == 2 and "member" in out
    code, out = _cli(capsys, "audit", "--config", str(cfg_path), "--confidence", "1.5")
    assert code == 2 and "confidence" in out
