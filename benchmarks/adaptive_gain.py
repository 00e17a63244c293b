"""Screened PMixED (adaptive) against plain PMixED on the same held-out positions and runs.

    python benchmarks/adaptive_gain.py --config configs/quick.toml [--runs 4] [--out docs/examples/adaptive]

One pass of the members over the evaluation blocks (all members at every position, so that a
private screen can be scored too), then, on the same positions and the same release draws:
plain PMixED at several epsilon and T (sessions of T queries, a fresh budget each), and screened
PMixED with a public screen (the public model's entropy, no cost) at several thresholds and with
a private screen (weight 1 on the test members' divergence score, a few eps_s), each with
private_queries set to the number of private answers the threshold leaves in a session of T
(measured on the public model over these positions: public information). Prints and writes the
table of gain share kept, (PPL public - PPL) / (PPL public - PPL fine-tuned), and a PNG of
epsilon spent against queries answered for both mechanisms.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--out", default=None, help="folder for adaptive.{json,md,png} (default: <output_dir>/adaptive)")
    ap.add_argument("--queries", type=int, default=1024)
    args = ap.parse_args(argv)

    import torch

    from pmixed.config import load_run_config
    from pmixed.errors import ConfigError
    from pmixed.eval.perplexity import make_adaptive_setup, make_setup, run_evaluation
    from pmixed.eval.report import gain_kept
    from pmixed.eval.runner import eval_blocks, load_runtime, machine
    from pmixed.privacy.calibration import DEFAULT_LAM_MAX, DEFAULT_TAIL

    cfg = load_run_config(Path(args.config), None)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, runs=args.runs))
    ens, rt = load_runtime(cfg, progress=False)
    blocks = eval_blocks(ens, cfg)
    B, L = blocks.shape
    Q = B * (L - 1)
    T = min(args.queries, Q)
    p = cfg.privacy
    N = cfg.data.n_parts
    # the config's lam_max and tail; the order is left to the calibration (a config's fixed alpha may
    # be infeasible at the other epsilons of the grid)
    base = dict(delta=p.delta, ensemble_size=N, sample_rate=p.sample_rate, lam_max=p.lam_max or DEFAULT_LAM_MAX,
                tail=p.tail or DEFAULT_TAIL, alpha=None)

    # the public model's entropy at the scored positions: public information (the queries' own)
    from pmixed.eval.block_stats import block_stats

    H = torch.cat([block_stats(rt, blocks[b], max_order=2, members=0, average=True).stats.public_entropy
                   for b in range(B)])[:T]
    thresholds = [round(float(H.quantile(f)), 2) for f in (0.25, 0.5, 0.75)]

    def frac_above(th: float) -> float:
        return float((H >= th).double().mean())

    setups = []
    for eps in (0.5, 2.0, 8.0):
        for t in sorted({x for x in (128, 256, 512) if x < T} | {T}):
            try:
                setups.append(make_setup(f"plain eps={eps:g} T={t}", runs=args.runs, epsilon=eps,
                                         query_budget=t, sweep={"epsilon": eps, "queries": t}, **base))
            except ConfigError as err:
                print(f"skip plain eps={eps} T={t}: {err}")
        for th in thresholds:
            K = max(1, math.ceil(frac_above(th) * T))
            try:
                setups.append(make_adaptive_setup(
                    f"public screen eps={eps:g} theta={th:g} K={K}", runs=args.runs, queries=T, epsilon=eps,
                    private_queries=K, screen_threshold=th, sweep={"epsilon": eps, "theta": th}, **base))
            except ConfigError as err:
                print(f"skip public screen eps={eps} theta={th}: {err}")
        for es in (0.05, 0.2):
            th = thresholds[1] + 0.5  # half a nat above the median, lowered by the members' score
            K = max(1, math.ceil(0.5 * T))
            try:
                setups.append(make_adaptive_setup(
                    f"private screen eps={eps:g} eps_s={es:g} K={K}", runs=args.runs, queries=T, epsilon=eps,
                    private_queries=K, screen_threshold=th, screen_weight=1.0, screen_epsilon=es, screen_rate=0.5,
                    sweep={"epsilon": eps, "screen_epsilon": es}, **base))
            except ConfigError as err:
                print(f"skip private screen eps={eps} eps_s={es}: {err}")

    t0 = time.perf_counter()
    res = run_evaluation(rt, blocks, setups, extras=tuple(rt.extra_index), seed=cfg.eval.seed, ledger_dir=None,
                         progress=False, average=False, chunk=cfg.eval.chunk_for(rt.device.type))
    seconds = time.perf_counter() - t0
    pub = res.models["public"]["ppl"]
    ft = res.models.get("finetune", {}).get("ppl")
    oracle = _oracle_rows(rt, blocks, T, args.runs, base, cfg.eval.seed)
    rows = []
    for s in res.pmixed:
        share = gain_kept(pub, s["ppl_mean"], ft) if ft is not None else float("nan")
        rows.append({**{k: s[k] for k in ("name", "epsilon", "queries", "ppl_mean", "ppl_std", "epsilon_spent")},
                     "mechanism": s.get("mechanism", "pmixed"), "gain_share": share,
                     "private_fraction": s.get("private_fraction", 1.0),
                     "private_answers": s.get("units_per_session", s["queries"]),
                     "queries_before_stop": s.get("queries_before_stop", s["queries"])})
    for o in oracle:
        rows.append({**o, "gain_share": gain_kept(pub, o["ppl_mean"], ft) if ft is not None else float("nan")})
    lines = [f"# screened vs plain PMixED: {cfg.source_path}, {args.runs} runs, {T} positions, "
             f"public {pub:.2f}, fine-tuned {ft:.2f}" if ft else "",
             "", "| setup | PPL | gain share | private answers / session | stopped after |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['ppl_mean']:.2f} ± {r['ppl_std']:.2f} | {100 * r['gain_share']:.1f}% | "
                     f"{r['private_answers']:.0f} | {r['queries_before_stop']:.0f} |")
    for name in ("dpsgd", "dpsgd_unit"):
        if name in res.models and ft:
            lines.append(f"\n{name}: PPL {res.models[name]['ppl']:.2f}, gain share "
                         f"{100 * gain_kept(pub, res.models[name]['ppl'], ft):.1f}%")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out) if args.out else cfg.output_dir / "adaptive"
    out.mkdir(parents=True, exist_ok=True)
    (out / "adaptive.md").write_text(text + "\n")
    (out / "adaptive.json").write_text(json.dumps({"rows": rows, "models": res.models, "thresholds": thresholds,
                                                   "seconds": seconds, "machine": machine()}, indent=2, default=float))
    _plot(rows, spend_curves(setups, H, T), out / "adaptive.png", pub, ft)
    print(f"wrote {out}/adaptive.{{md,json,png}} ({seconds:.0f}s)")
    return 0


def _oracle_rows(rt, blocks, T: int, runs: int, base: dict, seed: int) -> list[dict]:
    """NOT a mechanism (non-private, for reference only): free screens that send to PMixED exactly
    the K positions of the session where the members differ most from the public model (largest
    mean chi-square a_2 over all members), or where the ensemble's gain at the true next token is
    largest (a screen that knows the answer), with the release calibrated for K units at epsilon 2
    and 8. The second bounds what any screen with K private answers could keep here."""
    import torch

    from pmixed.errors import ConfigError
    from pmixed.eval.block_stats import block_stats
    from pmixed.mechanism.teacher_forcing import released_target_probs
    from pmixed.privacy.screening import ScreenParams, calibrate_adaptive

    B, L = blocks.shape
    stats = [block_stats(rt, blocks[b], max_order=32, average=True).stats for b in range(B)]
    N = base["ensemble_size"]
    chi = torch.cat([st.moments[:, :, 0].mean(dim=1) for st in stats])[:T]  # [T]
    # the ensemble's own gain at the true token: a screen that knows the answer
    gain = torch.cat([torch.log(st.member_target.mean(dim=1)) - torch.log(st.public_target) for st in stats])[:T]
    rows = []
    ks = [k for k in (128, 256, 512) if k < T] or [max(1, T // 4)]
    for (how, score), eps, K in itertools.product((("divergence", chi), ("true gain", gain)), (2.0, 8.0), ks):
        kw = {k: v for k, v in base.items() if k != "ensemble_size"}
        try:
            cal = calibrate_adaptive(epsilon=eps, private_queries=K, ensemble_size=N,
                                     screen=ScreenParams(N, threshold=0.0), **kw)
        except ConfigError:
            continue
        rel = cal.params.release
        if rel.max_order > 32:
            continue
        top = torch.zeros(B * (L - 1), dtype=torch.bool)
        top[score.topk(K).indices] = True
        ppls = []
        for r in range(runs):
            g = torch.Generator().manual_seed(seed * 1000 + r)
            total = 0.0
            for b in range(B):
                n_b = min(L - 1, max(0, T - b * (L - 1)))
                if n_b == 0:
                    break
                draw = torch.rand(L - 1, N, generator=g, dtype=torch.float64) < rel.sample_rate
                use = draw & top[b * (L - 1):(b + 1) * (L - 1), None]
                probs, _ = released_target_probs(stats[b], use, rel)
                total -= float(torch.log(probs[:n_b]).sum())
            ppls.append(math.exp(total / T))
        mean = sum(ppls) / len(ppls)
        std = math.sqrt(sum((x - mean) ** 2 for x in ppls) / max(1, len(ppls) - 1))
        rows.append({"name": f"ORACLE screen by {how} (non-private bound) eps={eps:g} K={K}", "epsilon": eps,
                     "queries": T, "ppl_mean": mean, "ppl_std": std, "epsilon_spent": float("nan"),
                     "mechanism": "oracle", "private_fraction": K / T, "private_answers": K,
                     "queries_before_stop": T})
    return rows


def spend_curves(setups, H, T: int) -> dict[str, list[float]]:
    """Epsilon spent after each of the T queries of one session at epsilon 8: plain PMixED (fixed
    per-query cost, T queries) and each public screen (a unit at every round opened; the screen
    is a fixed rule on the public entropy H, so the curve is exact, no run needed)."""
    from pmixed.privacy.calibration import epsilon_after
    from pmixed.privacy.conversion import epsilon_at_order

    curves = {}
    for s in setups:
        if s.epsilon != 8.0:
            continue
        if s.adaptive is None and s.queries == T:
            curves[f"plain PMixED (T = {T})"] = [epsilon_after(s.params, t, s.delta) for t in range(1, T + 1)]
        elif s.adaptive is not None and not s.adaptive.screen.private:
            p = s.adaptive
            u = p.unit_rdp(p.order)
            out, units, is_open = [], 0, False
            for t in range(T):
                if not is_open:
                    if epsilon_at_order((units + 1) * u, p.order, s.delta) > s.epsilon:
                        out += [out[-1]] * (T - t)  # the filter stops private answers
                        break
                    units, is_open = units + 1, True
                out.append(epsilon_at_order(units * u, p.order, s.delta))
                if float(H[t]) >= p.screen.threshold:
                    is_open = False  # a private answer closes the round
            curves[f"public screen theta={p.screen.threshold:g} ({p.private_queries} units)"] = out
    return curves


def _plot(rows, curves, path: Path, pub: float, ft: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, c in curves.items():
        axes[0].plot(range(1, len(c) + 1), c, label=name)
    axes[0].set_xlabel("queries answered in the session")
    axes[0].set_ylabel("epsilon spent (budget 8)")
    axes[0].set_title("epsilon spent against queries")
    for mech, marker in (("pmixed", "o"), ("adaptive", "s"), ("oracle", "x")):
        pts = [r for r in rows if r["mechanism"] == mech and r["queries"] == max(x["queries"] for x in rows)]
        if mech == "pmixed":
            pts = [r for r in pts if "T=" not in r["name"] or r["name"].endswith(f"T={r['queries']}")]
        label = {"pmixed": "plain PMixED, T = 1024", "adaptive": "screened PMixED",
                 "oracle": "oracle screens (non-private bounds)"}[mech]
        axes[1].scatter([r["epsilon"] for r in pts], [100 * r["gain_share"] for r in pts], marker=marker, label=label)
    axes[1].set_xlabel("epsilon")
    axes[1].set_ylabel("share of the fine-tuning gain kept (%)")
    axes[1].set_xscale("log")
    axes[1].set_title("gain share, 1024 queries per session")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
