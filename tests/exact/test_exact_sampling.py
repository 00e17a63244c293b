"""Why the server takes only temperature 1, top_p 1, top_k 0 (docs/privacy.md section 8b).

The guarantee is about a token drawn from the mechanism's distribution, marginalised over the
Poisson draw: (1 - c) R + c pbar_i (Lemma 1). Temperature, top-k and top-p as a server would apply
them act on each draw's mixture (M1) before the token is drawn, so the token's distribution is
E_S[f(M_S)], which has no such form. Exact enumeration on tiny instances (every subset, both
neighbours, the library's own release and sampling transforms): with the transforms the exact
divergence exceeds the charge, without bound for top-k, top-p and greedy; as released, it does not.
"""

import numpy as np
import pytest
import torch

from pmixed.mechanism.release import release
from pmixed.mechanism.sampling import postprocess
from pmixed.privacy.mixture_bound import query_rdp
from pmixed.privacy.params import MechanismParams
from tests.exact.harness import softmax, worst_ratio_replace

PARAMS = MechanismParams(3, 0.5, 0.9, (0.5, 0.5))
ORDERS = [2, 3]


def worst(transform: dict, instances: int = 60, seed: int = 0) -> float:
    charged = [query_rdp(a, PARAMS) for a in ORDERS]

    def fn(public, drawn):
        m = release(torch.from_numpy(public), torch.from_numpy(drawn), PARAMS)
        return postprocess(m.clone(), **transform).numpy()

    rng = np.random.default_rng(seed)
    out = 0.0
    for _ in range(instances):
        pub = softmax(rng.normal(size=5))
        members = np.stack([softmax(3 * rng.normal(size=5)) for _ in range(PARAMS.ensemble_size)])
        other = softmax(3 * rng.normal(size=5))
        out = max(out, worst_ratio_replace(pub, members, other, 0, PARAMS.sample_rate, fn, ORDERS, charged))
    return out


def test_the_distribution_as_released_stays_within_the_charge():
    assert worst({}) <= 1.0


@pytest.mark.parametrize("transform", [{"top_k": 1}, {"top_p": 0.8}])
def test_top_k_top_p_and_greedy_on_each_draw_are_not_covered(transform):
    assert worst(transform) == float("inf")


def test_a_lower_temperature_on_each_draw_exceeds_the_charge():
    assert worst({"temperature": 0.5}, instances=200) > 1.0
