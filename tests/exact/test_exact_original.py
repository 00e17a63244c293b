"""The same exact check applied to the original code's rules must FAIL: it shows the check has
teeth (REFERENCE.md section 4, defects 1-2: beta re-solved from the realised draw, the ball
enforced at order alpha only, the pairwise bound 4 k beta)."""

import numpy as np

from pmixed.privacy.calibration import calibrate
from pmixed.privacy.original_rules import eps_sub, reference_budget, solve_beta
from tests.exact.harness import adversarial_search, softmax, worst_ratio_replace
from tests.exact.original_release import original_release_fn
from tests.exact.test_exact_pmixed import check as check_ours

ALPHA = 3
PER_QUERY = reference_budget(8, 1e-5, ALPHA) / 1024  # the original's per-query charge at order 3

# Found by tests/exact/harness.adversarial_search (seed 5, logit scale 20, 5 restarts x 300
# Nelder-Mead steps) against the original rules with N=2, q=0.5, V=3, alpha=3, eps=8, T=1024.
# Rows: public, member 0, member 1, replacement of member 0 (logits).
WITNESS = np.array([
    -5.945527979678369, -4.823561639495248, 7.188660115845444,
    -27.34527707209132, 15.793254140665141, -20.227314423575862,
    -7.907199718413814, -31.50834482708686, 27.22238361458789,
    6.888456221257904, -0.2779099364845812, 17.23455072968612,
]).reshape(4, 3)


def ratio_original(q, public, members, replacement, fixed_beta=None):
    fn = original_release_fn(ALPHA, q, PER_QUERY, fixed_beta=fixed_beta)
    charged = PER_QUERY if fixed_beta is None else eps_sub(ALPHA, q, members.shape[0], fixed_beta)
    return worst_ratio_replace(public, members, replacement, 0, q, fn, [ALPHA], [charged])


def test_pinned_witness_breaks_the_original_with_subsampling():
    pub, mem, rep = softmax(WITNESS[0]), softmax(WITNESS[1:3]), softmax(WITNESS[3])
    ratio = ratio_original(0.5, pub, mem, rep)
    assert ratio > 2.0, ratio  # the original charges less than half of the exact divergence
    # our mechanism on the same distributions, calibrated for the same target, is within its charge
    ours = calibrate(epsilon=8.0, delta=1e-5, query_budget=1024, ensemble_size=2, sample_rate=0.5).params
    assert check_ours(ours, pub, mem, rep, precise=True) <= 1.0


def test_search_breaks_the_original_without_subsampling():
    # q = 1, N = 2: beta fixed (the realised n is always 2), ball at order 3 only
    beta = solve_beta(ALPHA, 1.0, 2, PER_QUERY)
    rng = np.random.default_rng(1)

    def objective(theta):
        t = theta.reshape(4, 3)
        return ratio_original(1.0, softmax(t[0]), softmax(t[1:3]), softmax(t[3]), fixed_beta=beta)

    worst, _ = adversarial_search(objective, 12, rng, restarts=3, maxiter=200, scale=10.0)
    assert worst > 10.0, worst
