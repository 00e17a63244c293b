"""A naive per-token PMixED release in the style of the ORIGINAL research code (Flemings et al.),
the baseline of benchmarks/mechanism.py and benchmarks/eval_speed.py (REFERENCE.md sections 2-4,
section 4 item 6). Reimplemented from a description of the original's style, NOT sound, NOT used
by the package.

Per query (one token), exactly in the original's style:

1. the drawn members are given (the caller draws them: same Poisson draws as our path);
2. beta is re-solved for the realised number n of drawn members by bisection on [0, 5] with the
   original's 20 steps (``pmixed.privacy.original_rules.solve_beta``, the original's
   ``scipy.optimize.bisect(f, 0, 5, maxiter=20)``), f(beta) = eps_sub(alpha; q, n, beta) - eps / T,
   eps_sub evaluated with Python math on every call (``original_rules.eps_sub``; defect 1 of
   REFERENCE.md section 4);
3. for each drawn member: if f(1) <= 0 then lam = 1, else
   ``lam = scipy.optimize.bisect(f, 0, 1, maxiter=20, disp=False)`` (a midpoint: defect 5), with
   f(lam) = RDSym(mix(lam), p_pub) - alpha * beta, mix(lam) = lam * p + (1 - lam) * p_pub in float32
   on the full [V] tensors, and RDSym(p, q) = max(D(p, q), D(q, p)).item() where each D casts BOTH
   inputs to float64 (``.type(torch.float64)``), computes 1/(a-1) log sum (p/q)^a q, falls back to
   log max(p/q) when that is nan, and casts the result to float32;
4. the mixed distributions (float32) are stacked and averaged; p_pub alone when nobody is drawn.

``eps`` is the original's RDP budget over all T queries (``rdp_budget``: eps=8, delta=1e-5, a=3
give 3.1983), so eps / T is the per-query target. alpha = 3 as in the paper.
``naive_block`` is the original's teacher-forced loop: one ``naive_release`` call per position.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from scipy.optimize import bisect

try:  # the installed package (or PYTHONPATH) first; the checkout's src/ otherwise
    import pmixed  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pmixed.privacy import original_rules  # noqa: E402
from pmixed.privacy.original_rules import reference_budget as rdp_budget  # noqa: E402, F401 (re-exported)

ALPHA = 3  # the paper's order (eps = 8)
MAXITER = 20  # the original's scipy bisect maxiter
STATS = {"lam_one": 0, "bisect": 0}  # how often solve_lambda took each branch (diagnostics)


def renyi_div(p: torch.Tensor, q: torch.Tensor, alpha: float) -> torch.Tensor:
    """D_a(p || q) in the original's style: float64 casts of both inputs, direct (non-log-space)
    sum, fallback to log max(p/q) when nan, result cast to float32."""
    p = p.type(torch.float64)
    q = q.type(torch.float64)
    rd = 1.0 / (alpha - 1) * torch.log(torch.sum((p / q) ** alpha * q))
    if torch.isnan(rd):
        rd = torch.log(torch.max(p / q))
    return rd.type(torch.float32)


def rd_sym(p: torch.Tensor, q: torch.Tensor, alpha: float) -> float:
    return torch.max(renyi_div(p, q, alpha), renyi_div(q, p, alpha)).item()


def solve_beta(alpha: int, q: float, n: int, eps: float, T: int) -> float:
    """original_rules.solve_beta with the original's call: target eps / T, [0, 5], 20 steps."""
    return original_rules.solve_beta(alpha, q, n, eps / T, iters=MAXITER, hi=5.0)


def solve_lambda(p: torch.Tensor, p_pub: torch.Tensor, alpha: float, radius: float) -> float:
    def f(lam: float) -> float:
        mix = lam * p + (1 - lam) * p_pub  # float32 [V]
        return rd_sym(mix, p_pub, alpha) - radius

    if f(1.0) <= 0:
        STATS["lam_one"] += 1
        return 1.0
    STATS["bisect"] += 1
    return bisect(f, 0, 1, maxiter=MAXITER, disp=False)


def naive_release(
    public: torch.Tensor,
    members: torch.Tensor,
    alpha: int = ALPHA,
    q: float = 0.03,
    eps: float | None = None,
    T: int = 1024,
) -> torch.Tensor:
    """public [V], members [m, V] (the drawn members, float32 probabilities) -> [V] float32."""
    eps = rdp_budget(alpha=alpha) if eps is None else eps
    p_pub = public.float()
    n = members.shape[0]
    if n == 0:
        return p_pub
    beta = solve_beta(alpha, q, n, eps, T)
    radius = alpha * beta
    mixed = []
    for i in range(n):
        p = members[i].float()
        lam = solve_lambda(p, p_pub, alpha, radius)
        mixed.append(lam * p + (1 - lam) * p_pub)
    return torch.stack(mixed).mean(dim=0)


def naive_block(
    public: torch.Tensor,
    member_rows: torch.Tensor,
    row_position: torch.Tensor,
    alpha: int = ALPHA,
    q: float = 0.03,
    eps: float | None = None,
    T: int = 1024,
    *,
    targets: torch.Tensor | None = None,
    positions: range | None = None,
) -> torch.Tensor:
    """One ``naive_release`` call per position (the original's loop over a teacher-forced block).

    Same inputs as ``release_rows``. Returns [P', V] float32, or [P'] target probabilities when
    ``targets`` is given, for the positions in ``positions`` (default: all P).
    """
    P = public.shape[0]
    positions = range(P) if positions is None else positions
    out = []
    for p in positions:
        rows = torch.nonzero(row_position == p).flatten()
        dist = naive_release(public[p], member_rows[rows], alpha, q, eps, T)
        out.append(dist[targets[p]] if targets is not None else dist)
    return torch.stack(out)
