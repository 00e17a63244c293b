"""Fused CPU kernels (numba) for the mechanism's hot path: row checks, the moments a_k and the mix;
and the constant-time post-processing and sampling of the released distribution (fixed-round
threshold searches for top-k / top-p, a whole-vector count for inversion sampling: no sort, no
binary search, no early exit; ``sampling.py`` says why).

The reference implementation (``divergence.abs_moments`` on float64 copies) makes ~10 passes over
each member row; these kernels make two (a check pass and a moment pass), vectorised, and never
copy the inputs to float64. Every quantity is computed in float64 from the inputs converted elementwise
(float32 -> float64 is exact), with the same formulas as the reference:

    T_i  = sum_y x_i(y),   T_0 = sum_y y_0(y)                   (totals; inputs need not sum to 1)
    d(y) = x_i(y) (T_0 / T_i) / y_0(y) - 1                     (= p_i(y)/p_0(y) - 1)
    a_k  = sum_y (y_0(y) / T_0) |d(y)|^k,  k = 2..K           (docs/privacy.md eq. (B2))

Sums may be reassociated (vectorised); the rounding error of any summation order is at most
(V - 1) u sum|terms| (u = 2^-53), ~6e-12 relative for V = 50k, far inside the projection's 1e-9
margin (docs/privacy.md section 7). CUDA tensors, other dtypes, a missing numba, or
``PMIXED_KERNELS=torch`` use the torch reference instead (``divergence.py``); tests check that the
two agree.
"""

from __future__ import annotations

import os

import numpy as np

try:  # numba is a dependency of the package; a platform without wheels falls back to torch
    from numba import njit
except ImportError:  # pragma: no cover - exercised only where numba is missing
    njit = None

AVAILABLE = njit is not None
FASTMATH = {"reassoc", "contract"}  # reorder sums, fuse multiply-adds; nan/inf keep their meaning
# error_model="numpy": x / 0 is inf or nan as in IEEE 754 (no ZeroDivisionError branch, so loops vectorise)
KERNEL = {"cache": True, "nogil": True, "fastmath": FASTMATH, "error_model": "numpy"}
BAD_VALUES, ZERO_MASS = 1, 2  # row status codes returned by the kernels


def enabled() -> bool:
    """True when the fused kernels are used for CPU tensors (numba present, not disabled)."""
    return AVAILABLE and os.environ.get("PMIXED_KERNELS", "fused") != "torch"


if AVAILABLE:

    @njit(**KERNEL)
    def _sum_neg(x):  # x [V] -> (float64 sum, number of negative entries); nan and inf show in the sum
        s = 0.0
        neg = 0
        for v in range(x.shape[0]):
            xv = np.float64(x[v])
            s += xv
            neg += xv < 0.0
        return s, neg

    @njit(cache=True, nogil=True)
    def _status(s, neg):
        if not np.isfinite(s) or neg > 0:
            return BAD_VALUES
        if s <= 0.0:
            return ZERO_MASS
        return 0

    @njit(cache=True, nogil=True)
    def rows_check(x, idx, tot, status):
        """Rows idx [n] of x [M, V] -> tot [n] float64 row sums, status [n] (0 ok, BAD_VALUES,
        ZERO_MASS)."""
        for i in range(idx.shape[0]):
            s, neg = _sum_neg(x[idx[i]])
            tot[i] = s
            status[i] = _status(s, neg)

    # The fast kernels assume p_0 > 0 everywhere. Where p_0(y) = 0 they produce nan (0/0 or 0*inf),
    # and the row is recomputed by _moments_any, which treats those entries exactly.

    @njit(**KERNEL)
    def _moments_k2(y, x, c, iT0, out):
        m2 = 0.0
        for v in range(x.shape[0]):
            yv = np.float64(y[v])
            d = np.float64(x[v]) * c / yv - 1.0
            m2 += yv * iT0 * (d * d)
        out[0] = m2

    @njit(**KERNEL)
    def _moments_k3(y, x, c, iT0, out):
        m2 = 0.0
        m3 = 0.0
        for v in range(x.shape[0]):
            yv = np.float64(y[v])
            d = abs(np.float64(x[v]) * c / yv - 1.0)
            wd2 = yv * iT0 * (d * d)
            m2 += wd2
            m3 += wd2 * d
        out[0] = m2
        out[1] = m3

    @njit(**KERNEL)
    def _moments_k4(y, x, c, iT0, out):
        m2 = 0.0
        m3 = 0.0
        m4 = 0.0
        for v in range(x.shape[0]):
            yv = np.float64(y[v])
            d = abs(np.float64(x[v]) * c / yv - 1.0)
            d2 = d * d
            wd2 = yv * iT0 * d2
            m2 += wd2
            m3 += wd2 * d
            m4 += wd2 * d2
        out[0] = m2
        out[1] = m3
        out[2] = m4

    @njit(**KERNEL)
    def _moments_any(y, x, c, iT0, out):  # any K (out [K-1]); exact where p_0 has zeros
        out[:] = 0.0
        for v in range(x.shape[0]):
            yv = np.float64(y[v])
            xv = np.float64(x[v])
            if yv > 0.0:
                d = abs(xv * c / yv - 1.0)
                w = yv * iT0 * d
                for j in range(out.shape[0]):
                    w *= d
                    out[j] += w
            elif xv > 0.0:  # mass outside p_0's support: no finite ball contains it
                out[:] = np.inf
                return

    @njit(cache=True, nogil=True)
    def pair_moments(public, ptot, members, pos, rows, mtot, out):
        """Moments of (position, member row) pairs.

        public [P, V] (any float), ptot [P] float64 its row sums, members [M, V] (any float),
        pos [R] int64 (any order), rows [R] int64 (row of ``members`` paired with ``pos``), mtot [R] float64
        the members' row sums (from ``rows_check``) -> out [R, K-1] float64 (inf: no finite ball).
        """
        K1 = out.shape[1]
        for r in range(pos.shape[0]):
            p = pos[r]
            y = public[p]
            x = members[rows[r]]
            c = ptot[p] / mtot[r]  # p_i / p_0 = (x / T_i) / (y / T_0) = x (T_0 / T_i) / y
            iT0 = 1.0 / ptot[p]
            o = out[r]
            if K1 == 3:
                _moments_k4(y, x, c, iT0, o)
            elif K1 == 2:
                _moments_k3(y, x, c, iT0, o)
            elif K1 == 1:
                _moments_k2(y, x, c, iT0, o)
            else:
                o[0] = np.nan
            if not np.isfinite(o[:K1].sum()):  # zeros of p_0 (or K > 4): the exact loop
                _moments_any(y, x, c, iT0, o)
            for j in range(K1):  # overflow or nan: answer with p_0 alone (lam = 0)
                if not np.isfinite(o[j]):
                    o[j] = np.inf

    @njit(**KERNEL)
    def mix_row(y, c0, members, coef, out):
        """out [V] = c0 y + sum_i coef_i members_i (float64): the released distribution."""
        for v in range(y.shape[0]):
            out[v] = c0 * np.float64(y[v])
        for i in range(members.shape[0]):
            ci = coef[i]
            if ci == 0.0:  # lam = 0 (or an invalid row, whose values must not reach the sum)
                continue
            xi = members[i]
            for v in range(y.shape[0]):
                out[v] += ci * np.float64(xi[v])

    @njit(cache=True, nogil=True)
    def _lambda(mom, log_taus, lam_cap, margin):
        """eq. (P1) for one member: min(lam_cap, min_k (tau_k / (a_k (1 + margin)))^(1/k)), in log
        space; a_k = 0 gives no constraint, a_k = inf or nan gives 0 (same rules as the torch
        ``projection.lambdas_from_moments``)."""
        best = np.inf
        for j in range(mom.shape[0]):
            lb = (log_taus[j] - np.log(mom[j] * (1.0 + margin))) / (j + 2)
            if np.isnan(lb):
                lb = -np.inf
            best = min(best, lb)
        lam = min(np.exp(best), lam_cap)
        return 0.0 if np.isnan(lam) else lam

    @njit(cache=True, nogil=True)
    def lambdas(moments, log_taus, lam_cap, margin, out):
        """moments [R, K-1] -> out [R] mixing weights (eq. (P1))."""
        for r in range(moments.shape[0]):
            out[r] = _lambda(moments[r], log_taus, lam_cap, margin)

    @njit(cache=True, nogil=True)
    def release_one(public, members, log_taus, lam_cap, margin, out, mstatus, lam):
        """One query (eq. (M1)) in one call: validate, totals, moments, lam, mix.

        public [V], members [m, V] (m may be 0), log_taus [K-1] -> out [V] float64 the released
        distribution, lam [m], mstatus [m] members' row status; returns the public row's status
        (nonzero: nothing computed). An invalid member row gets lam 0 and never stops the query
        (pairs.py's docstring says why).
        """
        m = members.shape[0]
        T0, neg0 = _sum_neg(public)
        s0 = _status(T0, neg0)
        if s0 != 0:
            return s0
        if m == 0:  # nobody drawn: p_0 itself
            for v in range(public.shape[0]):
                out[v] = np.float64(public[v]) / T0
            return 0
        mtot = np.empty(m)
        for i in range(m):
            s, neg = _sum_neg(members[i])
            mstatus[i] = _status(s, neg)
            mtot[i] = s if mstatus[i] == 0 else 1.0
        pub2 = public.reshape((1, public.shape[0]))
        pos = np.zeros(m, dtype=np.int64)
        rows = np.arange(m)
        ptot = np.full(1, T0)
        mom = np.empty((m, log_taus.shape[0]))
        pair_moments(pub2, ptot, members, pos, rows, mtot, mom)
        lambdas(mom, log_taus, lam_cap, margin, lam)
        for i in range(m):  # an invalid member row: lam = 0, the public model answers for it
            if mstatus[i] != 0:
                lam[i] = 0.0
        coef = lam / (m * mtot)
        mix_row(public, (1.0 - lam.mean()) / T0, members, coef, out)
        return 0

    # ---------------------------------------------------------------- post-processing thresholds
    # (sampling.postprocess, top-k and top-p in constant time). ``bits`` [V] int64 are non-negative
    # float64 values' bit patterns, which order as the values do. Each search runs 63 rounds of one
    # whole pass, whatever the values: no sort, no early exit.

    @njit(**KERNEL)
    def _count_at_least(bits, cand):
        c = 0
        for i in range(bits.shape[0]):
            c += bits[i] >= cand
        return c

    @njit(**KERNEL)
    def _mass_at_least(bits, x, cand):
        s = 0.0
        for i in range(bits.shape[0]):
            s += x[i] if bits[i] >= cand else 0.0
        return s

    @njit(cache=True, nogil=True)
    def count_threshold(bits, k):
        """The largest t in [0, 2^63) with #{i: bits[i] >= t} >= k (top-k: the k-th largest)."""
        t = 0
        for b in range(62, -1, -1):
            cand = t | (1 << b)
            ok = _count_at_least(bits, cand) >= k
            t = cand if ok else t
        return t

    @njit(cache=True, nogil=True)
    def mass_threshold(bits, x, target):
        """The largest t in [0, 2^63) with sum{x[i]: bits[i] >= t} >= target (top-p). The masked
        sum is monotone in the set (rounding is monotone and the terms are >= 0), so the
        bisection is exact for the sum as computed."""
        t = 0
        for b in range(62, -1, -1):
            cand = t | (1 << b)
            ok = _mass_at_least(bits, x, cand) >= target
            t = cand if ok else t
        return t

    @njit(cache=True, nogil=True)
    def keep_top_k(x, v, k):
        """Zero all but the k largest entries of x [V] in place, given v, the k-th largest value
        (``count_threshold``): every entry above v, and ties at v lowest index first. Two whole
        passes."""
        above = 0
        for i in range(x.shape[0]):
            above += x[i] > v
        need = k - above
        ties = 0
        for i in range(x.shape[0]):
            tie = x[i] == v
            ties += tie
            keep = (x[i] > v) or (tie and ties <= need)
            x[i] = x[i] if keep else 0.0

    @njit(cache=True, nogil=True)
    def keep_top_p(x, v, target):
        """Zero all but the smallest prefix of x [V] sorted by value (ties by index) whose mass
        reaches ``target``, in place, given v (``mass_threshold``): every entry above v, and
        ties at v while the mass before them is short of the target. Two whole passes."""
        above = 0.0
        for i in range(x.shape[0]):
            above += x[i] if x[i] > v else 0.0
        before = above  # the mass before the current tie, in index order
        for i in range(x.shape[0]):
            tie = x[i] == v
            keep = (x[i] > v) or (tie and before < target)
            before += x[i] if tie else 0.0
            x[i] = x[i] if keep else 0.0

    @njit(cache=True, nogil=True)
    def sample_index(x, u):
        """The number of entries of x's running sum (its CDF, summed in index order as
        ``torch.cumsum`` does) that are <= u * total: a sampled index by inversion, counted over
        the whole vector (no binary search). Two whole passes."""
        total = 0.0
        for i in range(x.shape[0]):
            total += x[i]
        thr = u * total
        c = 0.0
        n = 0
        for i in range(x.shape[0]):
            c += x[i]
            n += c <= thr
        return n
