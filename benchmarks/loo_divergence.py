"""A NON-PRIVATE diagnostic: how far the members actually move PMixED's output on this data,
against what the guarantee charges (issue 14, item 3: data-dependent accounting only as a
diagnostic).

    python benchmarks/loo_divergence.py --config configs/quick.toml [--out docs/examples/loo/quick]

NOT a differential-privacy guarantee, and not to be published for a deployment: every number
below is a function of the private members. It is the leave-one-out divergence of the released
distribution, exactly computed per query:

What a client sees per query is the release marginalised over the hidden Poisson draw (eq. (M1)):

    P = P[S empty] p_0 + w sum_i pbar_i,     w = E[1{i in S} / |S|] = q E[1 / (1 + Bin(N - 1, q))],

with pbar_i member i projected into the ball (the library's own ``release`` of one member).
Emptying part i (a neighbour the guarantee covers: p_i replaced by p_0, so pbar_i by p_0) gives
P'_i = P - w (pbar_i - p_0). The realised per-query divergence is
rho_t(a) = max_i max(D_a(P || P'_i), D_a(P'_i || P)), summed over the session's T queries and
converted by (C1) like a charge. It is one neighbour per part (the emptied one), not the worst
one, so it is a lower bound on what this dataset could leak to these queries, which the charge
(R3) bounds for every dataset and every neighbour. AdaPMixED (REFERENCE.md section 5) reports
this kind of figure as its privacy loss; here it only shows the slack of the worst-case charge.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def member_weight(n: int, q: float) -> float:
    """w = q E[1 / (1 + B)], B ~ Bin(n - 1, q): the weight of one member's projected
    distribution in the release marginalised over the draw."""
    return q * sum(math.comb(n - 1, k) * q**k * (1 - q) ** (n - 1 - k) / (1 + k) for k in range(n))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", default=None, help="folder for loo.{md,json} (default: <output_dir>/loo)")
    args = ap.parse_args(argv)

    import torch

    from pmixed.config import load_run_config
    from pmixed.eval.runner import config_setup, eval_blocks, load_runtime
    from pmixed.mechanism.release import release
    from pmixed.models.stacked_lora import PUBLIC
    from pmixed.privacy.calibration import epsilon_after
    from pmixed.privacy.conversion import rdp_to_epsilon
    from pmixed.privacy.mixture_bound import query_rdp

    cfg = load_run_config(Path(args.config), None)
    ens, rt = load_runtime(cfg, progress=False)
    blocks = eval_blocks(ens, cfg)
    setup = config_setup(cfg, "loo")
    params = setup.params
    N, q, K = params.ensemble_size, params.sample_rate, params.max_order
    T = min(setup.queries, blocks.shape[0] * (blocks.shape[1] - 1))
    w = member_weight(N, q)
    p_empty = (1 - q) ** N
    orders = list(range(2, K + 1))  # where the charge makes a claim (K = the projection's order)
    # the realised divergence exists at every order: higher ones too, for its own conversion
    all_orders = orders + [a for a in (8, 16, 32, 64) if a > K]
    per_query = []  # [T] of {order: rho_t}
    with torch.no_grad():
        for block in blocks:
            if len(per_query) >= T:
                break
            ids = block[None, :-1]
            p0 = rt.probs(ids, [PUBLIC])[0].double()  # [L, V]
            p0 = p0 / p0.sum(-1, keepdim=True)
            members = torch.stack([rt.probs(ids, [i])[0] for i in range(N)])  # [N, L, V] float32
            for t in range(p0.shape[0]):
                if len(per_query) >= T:
                    break
                moved = torch.stack([release(p0[t], members[i, t].double()[None], params) - p0[t]
                                     for i in range(N)])  # [N, V] pbar_i - p_0 (the library's release)
                P = p0[t] + w * moved.sum(0)  # [V] the release marginalised over the draw
                lt = torch.log(P.clamp_min(1e-300))[None]  # [1, V]
                ln = torch.log((P[None] - w * moved).clamp_min(1e-300))  # [N, V] part i emptied
                row = {}
                for a in all_orders:  # in log space: no overflow at high orders
                    fwd = torch.logsumexp(a * lt + (1 - a) * ln, -1) / (a - 1)  # D_a(P || P'_i)
                    bwd = torch.logsumexp(a * ln + (1 - a) * lt, -1) / (a - 1)  # D_a(P'_i || P)
                    row[a] = float(torch.maximum(fwd, bwd).max())
                per_query.append(row)
    realised = [sum(r[a] for r in per_query) for a in all_orders]
    eps_real, a_real = rdp_to_epsilon(all_orders, realised, setup.delta)
    eps_charged = epsilon_after(params, T, setup.delta)
    lines = [f"# leave-one-out divergence of the release (NOT a DP guarantee): {cfg.source_path}, N = {N}, q = {q:g}, "
             f"T = {T} held-out queries, the config's calibration (epsilon {setup.epsilon:g}, delta {setup.delta:g})",
             "", "| order | charged RDP per query (R3) | realised LOO, mean per query | max per query | mean / charged |",
             "|---|---|---|---|---|"]
    for a, r in zip(all_orders, realised):
        mx = max(row[a] for row in per_query)
        c = T * query_rdp(a, params)
        ratio = f"{r / c:.3f}" if math.isfinite(c) else "no claim"
        lines.append(f"| {a} | {c / T:.3e} | {r / T:.3e} | {mx:.3e} | {ratio} |")
    lines.append(f"\nepsilon at delta {setup.delta:g} over the {T} queries: charged {eps_charged:.3f}; the realised "
                 f"leave-one-out divergence (NOT a guarantee) would convert to {eps_real:.3f} (order {a_real:g})")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out) if args.out else cfg.output_dir / "loo"
    out.mkdir(parents=True, exist_ok=True)
    (out / "loo.md").write_text(text + "\n")
    (out / "loo.json").write_text(json.dumps({
        "note": "NOT a differential-privacy guarantee: a function of the private members (the emptied-part neighbour)",
        "config": cfg.source_path, "N": N, "q": q, "T": T, "member_weight": w, "p_empty_draw": p_empty,
        "orders": all_orders, "charged_rdp": [T * query_rdp(a, params) for a in all_orders], "realised_rdp": realised,
        "realised_max_per_query": [max(row[a] for row in per_query) for a in all_orders], "epsilon_charged": eps_charged,
        "epsilon_realised_not_dp": eps_real}, indent=2))
    print(f"wrote {out}/loo.{{md,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
