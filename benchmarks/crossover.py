"""Where PMixED stops beating DP-SGD: gain share kept against the number of queries one budget
answers, plain and screened PMixED, against the DP-SGD model at the same unit.

    python benchmarks/crossover.py --config configs/quick.toml [--runs 4] [--epsilon 8] \
        [--out docs/examples/crossover/quick]

One pass of the members over the held-out blocks, then, on the same positions and draws, plain
PMixED calibrated for a session of T queries at one epsilon (delta and shape from the config,
the order left to the calibration), for T from 1024 up, and screened PMixED with a public screen
(the public model's entropy; no cost) whose threshold sends a fraction f of the queries to the
ensemble, calibrated for f T private units. A session longer than the held-out positions Q is
scored on its first Q queries, each at the T-query calibration: the per-query utility of that
session, estimated on Q positions (the queries are charged as released, so epsilon_spent is
what Q queries cost).

Prints and writes (crossover.{md,json,png}): the gain share (PPL public - PPL) / (PPL public -
PPL fine-tuned) of every point, the DP-SGD model's share at the same unit (``dpsgd_unit`` when
trained, else ``dpsgd``), and for each mechanism the crossover (the largest T measured whose
share is above DP-SGD's) and the largest T keeping 90% of plain PMixED's T = 1024 share.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

QUERIES = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
FRACTIONS = (0.5, 0.25)


def last_above(points: list[tuple[int, float]], level: float) -> int | None:
    """The largest T of the leading run of points (T ascending) whose share is above ``level``;
    None when the first is not."""
    best = None
    for t, share in sorted(points):
        if share <= level:
            break
        best = t
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--queries", default=",".join(map(str, QUERIES)), help="comma-separated session lengths T")
    ap.add_argument("--out", default=None, help="folder for crossover.{md,json,png} (default: <output_dir>/crossover)")
    args = ap.parse_args(argv)
    Ts = sorted({int(x) for x in args.queries.split(",") if x.strip()})

    import torch

    from pmixed.config import load_run_config
    from pmixed.errors import ConfigError
    from pmixed.eval.block_stats import block_stats
    from pmixed.eval.perplexity import make_adaptive_setup, make_setup, run_evaluation
    from pmixed.eval.report import gain_kept
    from pmixed.eval.runner import eval_blocks, load_runtime, machine
    from pmixed.privacy.calibration import DEFAULT_LAM_MAX, DEFAULT_TAIL

    cfg = load_run_config(Path(args.config), None)
    ens, rt = load_runtime(cfg, progress=False)
    blocks = eval_blocks(ens, cfg)
    B, L = blocks.shape
    Q = B * (L - 1)
    p = cfg.privacy
    N = cfg.data.n_parts
    base = dict(delta=p.delta, ensemble_size=N, sample_rate=p.sample_rate, lam_max=p.lam_max or DEFAULT_LAM_MAX,
                tail=p.tail or DEFAULT_TAIL, alpha=None)
    # the public model's entropy at the scored positions: public information (the queries' own)
    H = torch.cat([block_stats(rt, blocks[b], max_order=2, members=0, average=True).stats.public_entropy
                   for b in range(B)])[: min(Q, max(Ts))]
    thresholds = {f: round(float(H.quantile(1.0 - f)), 3) for f in FRACTIONS}

    setups = []
    for t in Ts:
        try:
            setups.append(make_setup(f"plain T={t}", runs=args.runs, epsilon=args.epsilon, query_budget=t,
                                     sweep={"queries": t}, **base))
        except (ConfigError, ValueError) as err:
            print(f"skip plain T={t}: {err}")
        for f, th in thresholds.items():
            K = max(1, math.ceil(f * t))
            try:
                setups.append(make_adaptive_setup(
                    f"public screen f={f:g} T={t}", runs=args.runs, queries=t, epsilon=args.epsilon,
                    private_queries=K, screen_threshold=th, sweep={"queries": t, "fraction": f}, **base))
            except (ConfigError, ValueError) as err:
                print(f"skip public screen f={f} T={t}: {err}")

    t0 = time.perf_counter()
    res = run_evaluation(rt, blocks, setups, extras=tuple(rt.extra_index), seed=cfg.eval.seed, ledger_dir=None,
                         progress=False, average=False, chunk=cfg.eval.chunk_for(rt.device.type))
    seconds = time.perf_counter() - t0
    pub = res.models["public"]["ppl"]
    ft = res.models["finetune"]["ppl"]
    dp_name = "dpsgd_unit" if "dpsgd_unit" in res.models else "dpsgd"
    dp_share = gain_kept(pub, res.models[dp_name]["ppl"], ft) if dp_name in res.models else None
    rows = []
    for s in res.pmixed:
        rows.append({"name": s["name"], "mechanism": s.get("mechanism", "pmixed"), "queries": s["queries"],
                     "fraction": s["sweep"].get("fraction", 1.0), "ppl_mean": s["ppl_mean"],
                     "ppl_std": s["ppl_std"], "gain_share": gain_kept(pub, s["ppl_mean"], ft),
                     "private_fraction": s.get("private_fraction", 1.0), "positions": s["positions"]})
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        label = "plain" if r["mechanism"] == "pmixed" else f"public screen f={r['fraction']:g}"
        curves.setdefault(label, []).append((r["queries"], r["gain_share"]))
    plain_1k = dict(curves.get("plain", [])).get(1024)
    summary = {}
    for label, pts in curves.items():
        summary[label] = {
            "crossover_T": last_above(pts, dp_share) if dp_share is not None else None,
            "T_at_90pct_of_plain_1024": last_above(pts, 0.9 * plain_1k) if plain_1k is not None else None,
        }

    head = (f"# PMixED against DP-SGD over the session length: {cfg.source_path}, epsilon {args.epsilon:g}, "
            f"delta {p.delta:g}, {args.runs} runs, {Q} held-out positions (sessions longer than that are "
            f"scored on their first {Q} queries), public {pub:.2f}, fine-tuned {ft:.2f}")
    lines = [head, "", "| setup | T | PPL | gain share | queries private |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['queries']} | {r['ppl_mean']:.2f} ± {r['ppl_std']:.2f} | "
                     f"{100 * r['gain_share']:.1f}% | {100 * r['private_fraction']:.0f}% |")
    if dp_share is not None:
        lines.append(f"\n{dp_name} (any number of tokens, its own epsilon): PPL {res.models[dp_name]['ppl']:.2f}, "
                     f"gain share {100 * dp_share:.1f}%")
    lines += ["", "| mechanism | crossover: largest T above DP-SGD | largest T keeping 90% of plain's T = 1024 share |",
              "|---|---|---|"]
    for label, sm in summary.items():
        def fmt(v):
            return "none measured" if v is None else (f">= {v}" if v == max(Ts) else str(v))
        lines.append(f"| {label} | {fmt(sm['crossover_T'])} | {fmt(sm['T_at_90pct_of_plain_1024'])} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out) if args.out else cfg.output_dir / "crossover"
    out.mkdir(parents=True, exist_ok=True)
    (out / "crossover.md").write_text(text + "\n")
    (out / "crossover.json").write_text(json.dumps(
        {"rows": rows, "summary": summary, "dpsgd": {"name": dp_name, "gain_share": dp_share},
         "models": res.models, "thresholds": {str(k): v for k, v in thresholds.items()}, "epsilon": args.epsilon,
         "positions": Q, "seconds": seconds, "machine": machine()}, indent=2, default=float))
    _plot(curves, dp_share, dp_name, out / "crossover.png", args.epsilon)
    print(f"wrote {out}/crossover.{{md,json,png}} ({seconds:.0f}s)")
    return 0


def _plot(curves, dp_share, dp_name: str, path: Path, epsilon: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, pts in curves.items():
        pts = sorted(pts)
        ax.plot([t for t, _ in pts], [100 * s for _, s in pts], marker="o", label=label)
    if dp_share is not None:
        ax.axhline(100 * dp_share, color="k", ls="--", label=f"{dp_name} (any T)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"queries per epsilon = {epsilon:g} budget (T)")
    ax.set_ylabel("share of the fine-tuning gain kept (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
