"""Exact output distributions of whole screened-PMixED interactions on tiny instances.

An interaction is T queries whose contexts are the tokens released so far (adaptive: the public
and member distributions are tables indexed by the prefix). What the adversary sees is, per
query, the screen's bit b_t (conservatively: the proof releases it) and the token y_t, and a final
"stop" when the filter refuses to open a round. Everything hidden is summed out exactly:

- each round's test subsample S_r (all 2^N subsets with their Poisson weights),
- each round's threshold noise rho_r (a one-dimensional integral, by quadrature between the kinks
  of the piecewise-exponential integrand),
- each query's noise nu_t (closed form: the Laplace CDF),
- each private release's Poisson draw (all subsets, through the library's ``release``).

The screen's scores come from the library (``public_entropy``, ``member_score`` of the chi-square
moment), so the oracle checks the code, not a re-implementation of it. ``variant`` changes the
screen to a deliberately unsound one, to show the check catches it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import integrate

from pmixed.mechanism.screen import chi_square, member_score, public_entropy
from pmixed.privacy.screening import AdaptiveParams
from tests.exact.harness import exact_mixture, pmixed_release_fn, renyi, subset_weights

Prefix = tuple[int, ...]


def tables(rng: np.random.Generator, V: int, N: int, T: int, spread: float = 2.0):
    """Random public [V] and member [N, V] distributions for every prefix of length < T."""
    pub, mem = {}, {}
    for n in range(T):
        for prefix in itertools.product(range(V), repeat=n):
            pub[prefix] = _softmax(rng.normal(0, spread, V))
            mem[prefix] = np.stack([_softmax(rng.normal(0, spread, V)) for _ in range(N)])
    return pub, mem


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _lap_cdf(x: float, b: float) -> float:
    return 0.5 * math.exp(x / b) if x < 0 else 1.0 - 0.5 * math.exp(-x / b)


def _lap_pdf(x: float, b: float) -> float:
    return math.exp(-abs(x) / b) / (2.0 * b)


class Oracle:
    """The exact transcript distribution of one dataset's tables under ``params`` with at most
    ``units`` rounds (the filter's budget, in units)."""

    def __init__(self, params: AdaptiveParams, units: int, T: int, variant: str = "sound"):
        self.params = params
        self.units = units
        self.T = T
        self.variant = variant
        self.release_fn = pmixed_release_fn(params.release)
        s = params.screen
        scale = {"sound": 1.0, "half_sensitivity": 0.5, "no_noise": 0.0}[variant]
        self.b_threshold = s.threshold_scale * scale
        self.b_query = s.query_scale * scale

    def scores(self, public: np.ndarray, members: np.ndarray) -> dict[tuple[int, ...], float]:
        """s_t for every possible test subsample S (eq. (S1)), via the library's score functions."""
        s = self.params.screen
        h = float(public_entropy(torch.from_numpy(public)[None])[0])
        if not s.private:
            return {(): h}
        g = member_score(chi_square(torch.from_numpy(public), torch.from_numpy(members))).numpy()
        out = {}
        for S, _w in subset_weights(members.shape[0], s.test_rate):
            out[tuple(S)] = h + s.weight / (s.test_rate * s.ensemble_size) * math.fsum(g[list(S)])
        return out

    def round_prob(self, history: dict[tuple[int, ...], list[tuple[float, int]]]) -> float:
        """P(the round's bits) = sum_S w(S) int Lap(rho) prod_t P(b_t | rho, s_t(S)) d rho."""
        s = self.params.screen
        theta = s.threshold
        weights = dict((tuple(S), w) for S, w in subset_weights(s.ensemble_size, s.test_rate)) if s.private else {(): 1.0}
        total = []
        for S, hist in history.items():
            w = weights[S]
            if self.b_threshold == 0.0 or self.b_query == 0.0:  # a deterministic screen
                ok = all((sc >= theta) == bool(b) for sc, b in hist)
                total.append(w * float(ok))
                continue
            bt, bq = self.b_threshold, self.b_query

            def f(rho: float, hist=hist, bt=bt, bq=bq) -> float:
                v = _lap_pdf(rho, bt)
                for sc, b in hist:
                    c = _lap_cdf(theta + rho - sc, bq)  # P(nu < theta + rho - s)
                    v *= (1.0 - c) if b else c
                return v

            kinks = sorted({0.0, *(sc - theta for sc, _ in hist)})
            pieces = [(-math.inf, kinks[0])] + list(zip(kinks, kinks[1:])) + [(kinks[-1], math.inf)]
            acc = math.fsum(integrate.quad(f, a, b, epsabs=0.0, epsrel=1e-13, limit=200)[0]
                            for a, b in pieces if a < b)
            total.append(w * acc)
        return math.fsum(total)

    def transcripts(self, pub: dict[Prefix, np.ndarray], mem: dict[Prefix, np.ndarray]) -> dict[tuple, float]:
        out: dict[tuple, float] = {}
        s = self.params.screen
        subsets = [tuple(S) for S, _ in subset_weights(s.ensemble_size, s.test_rate)] if s.private else [()]

        def dfs(t: int, prefix: Prefix, transcript: tuple, used: int, round_hist, acc: float) -> None:
            if acc == 0.0:
                return
            if t == self.T:
                factor = self.round_prob(round_hist) if round_hist is not None else 1.0
                out[transcript] = out.get(transcript, 0.0) + acc * factor
                return
            if round_hist is None:
                if used >= self.units:  # the filter refuses the next unit: the stream stops
                    out[transcript + ("stop",)] = out.get(transcript + ("stop",), 0.0) + acc
                    return
                used += 1
                round_hist = {S: [] for S in subsets}
            p0, members = pub[prefix], mem[prefix]
            sc = self.scores(p0, members)
            for b in (0, 1):
                hist = {S: h + [(sc[S], b)] for S, h in round_hist.items()}
                if b:
                    factor = self.round_prob(hist)
                    dist = exact_mixture(p0, members, self.params.release.sample_rate, self.release_fn)
                    for y in range(p0.shape[0]):
                        dfs(t + 1, prefix + (y,), transcript + ((1, y),), used, None, acc * factor * dist[y])
                else:
                    for y in range(p0.shape[0]):
                        dfs(t + 1, prefix + (y,), transcript + ((0, y),), used, hist, acc * p0[y])

        dfs(0, (), (), 0, None, 1.0)
        return out


def worst_ratio(params: AdaptiveParams, units: int, T: int, pub, mem, mem_other, orders: Sequence[int],
                variant: str = "sound") -> tuple[float, int]:
    """max over orders and both directions of exact D_a(transcripts) / (units * eps_unit(a))."""
    oracle = Oracle(params, units, T, variant)
    P = oracle.transcripts(pub, mem)
    Q = oracle.transcripts(pub, mem_other)
    keys = sorted(set(P) | set(Q), key=repr)
    p = np.array([P.get(k, 0.0) for k in keys])
    q = np.array([Q.get(k, 0.0) for k in keys])
    assert abs(p.sum() - 1.0) < 1e-9 and abs(q.sum() - 1.0) < 1e-9, (p.sum(), q.sum())
    worst, at = 0.0, orders[0]
    for a in orders:
        charged = units * params.unit_rdp(a)
        for d in (renyi(p, q, a), renyi(q, p, a)):
            r = math.inf if charged == 0.0 and d > 1e-12 else (0.0 if charged == 0.0 else d / charged)
            if r > worst:
                worst, at = r, a
    return worst, at
