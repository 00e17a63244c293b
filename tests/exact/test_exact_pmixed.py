"""Exact checks of the charged RDP (docs/privacy.md, section 6).

For tiny ensembles every Poisson subset is enumerated, the exact token distribution of two
neighbouring datasets (member 0 replaced) is computed by calling the library's own release, and
the exact Renyi divergence in both directions is compared with the per-query RDP the library
charges, at every order it claims. Instances: random, and found by an optimiser searching for
the worst ratio; q < 1 and q = 1.
"""

import numpy as np
import pytest

from pmixed.privacy.calibration import calibrate
from pmixed.privacy.mixture_bound import query_rdp
from pmixed.privacy.params import MechanismParams
from tests.exact.harness import (
    adversarial_search,
    pmixed_release_fn,
    softmax,
    worst_ratio_replace,
)


def check(params, public, members, replacement, precise=False):
    orders = list(range(2, params.max_order + 1))
    charged = [query_rdp(a, params) for a in orders]
    return worst_ratio_replace(public, members, replacement, 0, params.sample_rate,
                               pmixed_release_fn(params), orders, charged, precise=precise)


def random_params(rng, N, q):
    K = int(rng.integers(2, 6))
    lam_max = float(rng.uniform(0.05, 0.95 if q >= 1 else 1.0))
    taus = tuple(float(10 ** rng.uniform(-3, 1.5)) for _ in range(K - 1))
    return MechanismParams(N, q, lam_max, taus)


@pytest.mark.parametrize("q", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("N", [1, 2, 3, 5])
def test_random_instances(N, q):
    rng = np.random.default_rng(1000 * N + int(10 * q))
    worst = 0.0
    for _ in range(8 if N < 5 else 3):
        V = int(rng.integers(2, 5))
        params = random_params(rng, N, q)
        scale = float(rng.choice([0.5, 3.0, 10.0]))
        pub = softmax(rng.normal(0, scale, V))
        mem = softmax(rng.normal(0, scale, (N, V)))
        rep = softmax(rng.normal(0, scale, V))
        worst = max(worst, check(params, pub, mem, rep))
    assert worst <= 1.0, f"exact divergence exceeds the charge: ratio {worst}"


CASES = [
    # (N, q, V, T, lam_max): calibrated parameters, T=1 gives the largest radii (hardest case)
    (2, 1.0, 3, 1, 0.75),
    (3, 0.5, 3, 1, 0.9),
    (4, 0.3, 4, 16, 0.5),
    (2, 0.2, 4, 1024, 0.75),
]


@pytest.mark.parametrize("N,q,V,T,lam_max", CASES)
def test_adversarial_instances(N, q, V, T, lam_max):
    params = calibrate(epsilon=8.0, delta=1e-5, query_budget=T, ensemble_size=N,
                       sample_rate=q, lam_max=lam_max).params
    rng = np.random.default_rng(7 + N)

    def objective(theta):
        t = theta.reshape(N + 2, V)
        return check(params, softmax(t[0]), softmax(t[1:N + 1]), softmax(t[N + 1]))

    worst, theta = adversarial_search(objective, (N + 2) * V, rng, restarts=2, maxiter=150,
                                      scale=6.0)
    t = theta.reshape(N + 2, V)
    precise = check(params, softmax(t[0]), softmax(t[1:N + 1]), softmax(t[N + 1]), precise=True)
    assert worst <= 1.0 and precise <= 1.0, f"worst ratio found {worst} (precise {precise})"
    assert worst > 0.0


def test_check_catches_a_third_of_our_charge():
    """Teeth against our own bound: it is close enough to tight that charging a third of it fails."""
    params = calibrate(epsilon=8.0, delta=1e-5, query_budget=1, ensemble_size=2,
                       sample_rate=1.0, lam_max=0.75).params
    orders = list(range(2, params.max_order + 1))
    third = [query_rdp(a, params) / 3 for a in orders]
    rng = np.random.default_rng(3)

    def objective(theta):
        t = theta.reshape(4, 3)
        return worst_ratio_replace(softmax(t[0]), softmax(t[1:3]), softmax(t[3]), 0, 1.0,
                                   pmixed_release_fn(params), orders, third)

    worst, _ = adversarial_search(objective, 12, rng, restarts=2, maxiter=150, scale=6.0)
    assert worst > 1.0, worst
