"""The leave-one-corpus-out study of the default shape rule (issue: defaults that hold on data
nobody tuned on).

    python benchmarks/default_rule.py --config configs/quick.toml --config configs/quick-president.toml \
        --config configs/quick-mail.toml [--runs 4] [--out docs/examples/default-rule]

For every trained config (a corpus and its privacy unit): one pass of the members over its
held-out blocks, then plain PMixED at epsilon 8, delta 1e-5, T = 1024 on the same positions and
runs for every shape of a grid: tail s in {1, 3, 10, 30}, lam_max in {0.25, 0.5, 0.75, 0.9},
alpha in {auto, 4, 8} and q = min(1, m / N) for m in {2.4, 8, 16} expected members drawn
(at N = 8, m = 8 and m = 16 are both q = 1). The
gain share kept, (PPL public - PPL) / (PPL public - PPL fine-tuned), of each shape on each corpus is
*unaccounted* (chosen on held-out private units). Leave one corpus out: the shape with the best
mean relative share (share / that corpus's best share) over the other corpora is evaluated on the
left-out one. The shape chosen on all corpora is the candidate rule. Prints and writes the
per-corpus grid (JSON), the LOCO table (Markdown) and the DP-SGD-per-unit share next to it, and
the best worst-case ratio: over all corpora, and over corpora whose configs share every public
constant (they differ only in the private data, so any rule that reads no private data gives them
one shape: no such rule keeps more than that ratio on all of them).

    python benchmarks/default_rule.py --from docs/examples/default-rule/loco.json   # tables only
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from pmixed.eval.report import percent, write_study

TAILS = (1.0, 3.0, 10.0, 30.0)
LAM_MAX = (0.25, 0.5, 0.75, 0.9)
ALPHAS = (None, 4, 8)
MEMBERS = (2.4, 8.0, 16.0)


def shapes() -> list[tuple[float, float, int | None, float]]:
    """(tail, lam_max, alpha, m): m is the expected number of members drawn, q = min(1, m / N)."""
    return list(itertools.product(TAILS, LAM_MAX, ALPHAS, MEMBERS))


def key(shape) -> str:
    t, lm, a, m = shape
    return f"tail={t:g} lam_max={lm:g} alpha={'auto' if a is None else a} m={m:g}"


def study(config: str, runs: int, queries: int) -> dict:
    from pmixed.config import load_run_config
    from pmixed.errors import ConfigError
    from pmixed.eval.perplexity import make_setup, run_evaluation
    from pmixed.eval.report import gain_kept
    from pmixed.eval.runner import eval_blocks, load_runtime

    cfg = load_run_config(Path(config), None)
    ens, rt = load_runtime(cfg, progress=False)
    blocks = eval_blocks(ens, cfg)
    Q = blocks.shape[0] * (blocks.shape[1] - 1)
    T = min(queries, Q)
    N = cfg.data.n_parts
    setups, grid = [], {}
    for sh in shapes():
        t, lm, a, m = sh
        q = min(1.0, m / N)
        try:
            s = make_setup(key(sh), runs=runs, epsilon=8.0, delta=1e-5, query_budget=T, ensemble_size=N,
                           sample_rate=q, alpha=a, lam_max=lm, tail=t)
        except (ConfigError, ValueError):
            continue
        setups.append(s)
    p = cfg.privacy
    if p.tail is not None and p.lam_max is not None:  # the config's own shape, as shipped
        setups.append(make_setup("configured", runs=runs, epsilon=8.0, delta=1e-5, query_budget=T, ensemble_size=N,
                                 sample_rate=p.sample_rate, alpha=p.alpha, lam_max=p.lam_max, tail=p.tail))
    t0 = time.perf_counter()
    res = run_evaluation(rt, blocks, setups, extras=tuple(rt.extra_index), seed=cfg.eval.seed, ledger_dir=None,
                         progress=False, average=False, chunk=cfg.eval.chunk_for(rt.device.type))
    pub = res.models["public"]["ppl"]
    ft = res.models["finetune"]["ppl"]
    configured = None
    for s in res.pmixed:
        if s["name"] == "configured":
            configured = gain_kept(pub, s["ppl_mean"], ft)
            continue
        grid[s["name"]] = gain_kept(pub, s["ppl_mean"], ft)
    dpsgd_unit = res.models.get("dpsgd_unit", {}).get("ppl")
    return {"config": config, "corpus": f"{cfg.data.source} per {cfg.data.unit}", "N": N, "positions": T,
            "runs": runs, "public": pub, "finetune": ft, "grid": grid, "configured": configured,
            "configured_shape": None if configured is None else
            f"tail={p.tail:g} lam_max={p.lam_max:g} alpha={p.alpha or 'auto'} q={p.sample_rate:g}",
            "dpsgd_unit_share": gain_kept(pub, dpsgd_unit, ft) if dpsgd_unit else None,
            "seconds": time.perf_counter() - t0}


def pick(studies: list[dict]) -> str:
    """The shape with the best mean relative share over ``studies`` (shapes feasible on all)."""
    common = set.intersection(*(set(s["grid"]) for s in studies))
    def score(k: str) -> float:
        return sum(s["grid"][k] / max(s["grid"].values()) for s in studies) / len(studies)
    return max(sorted(common), key=score)


def public_constants(config: str) -> str:
    """Everything about a config that a shape rule without private data could read, as canonical
    JSON: N, the public model (and its pre-training), the members' LoRA and training settings.
    (The study fixes epsilon, delta, T and q = m / N for every corpus alike.) Two configs that
    differ only in their private data ([data] apart from n_parts, [run], [eval]) give the same."""
    import dataclasses

    from pmixed.config import load_run_config

    cfg = load_run_config(Path(config), None)
    return json.dumps({"N": cfg.data.n_parts, "model": dataclasses.asdict(cfg.model),
                       "public_pretrain": dataclasses.asdict(cfg.public_pretrain),
                       "lora": dataclasses.asdict(cfg.lora), "train": dataclasses.asdict(cfg.train)},
                      sort_keys=True, default=str)


def best_worst_case(studies: list[dict]) -> tuple[str, float]:
    """The shape whose smallest relative share over ``studies`` is largest, and that share: no
    single shape keeps more of every corpus's best. Corpora whose configs agree on every public
    constant (``public_constants``) get one shape from any rule that reads no private data, so
    over them this bounds what any such rule keeps on all of them."""
    common = set.intersection(*(set(s["grid"]) for s in studies))
    def worst(k: str) -> float:
        return min(s["grid"][k] / max(s["grid"].values()) for s in studies)
    k = max(sorted(common), key=worst)
    return k, worst(k)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", default=[])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--queries", type=int, default=1024)
    ap.add_argument("--out", default="docs/examples/default-rule")
    ap.add_argument("--from", dest="source", default=None,
                    help="redo the tables from a loco.json this script wrote (no evaluation runs)")
    args = ap.parse_args(argv)
    if args.source is None and not args.config:
        ap.error("give --config (one or more) or --from")
    if args.source is not None:
        studies = json.loads(Path(args.source).read_text())["studies"]
    else:
        studies = [study(c, args.runs, args.queries) for c in args.config]
    for s in studies:  # shapes are compared by (tail, lam_max, alpha, m): q = min(1, m / N) differs with N
        s["grid_m"] = s["grid"]
    lines = ["| left-out corpus (unit) | N | shape picked on the others | its share | best share (unaccounted sweep) | "
             "ratio | configured shape's share | DP-SGD per unit |", "|---|---|---|---|---|---|---|---|"]
    loco = []
    for i, s in enumerate(studies):
        others = [{"grid": o["grid_m"]} for j, o in enumerate(studies) if j != i]
        k = pick(others) if others else pick([{"grid": s["grid_m"]}])
        share = s["grid_m"].get(k, float("nan"))
        best_k = max(s["grid_m"], key=s["grid_m"].get)
        best = s["grid_m"][best_k]
        conf = s["configured"]
        loco.append({"corpus": s["corpus"], "picked": k, "share": share, "best": best, "best_shape": best_k,
                     "ratio": share / best, "configured": conf, "dpsgd_unit": s["dpsgd_unit_share"]})
        lines.append(f"| {s['corpus']} | {s['N']} | {k} | {100 * share:.1f}% | {100 * best:.1f}% ({best_k}) | "
                     f"{share / best:.2f} | {percent(conf)} | "
                     f"{percent(s['dpsgd_unit_share'])} |")
    rule = pick([{"grid": s["grid_m"]} for s in studies])
    lines.append(f"\nshape picked on all corpora (the candidate rule): {rule}")
    worst = []  # what one shape can keep on every corpus, and on corpora a public rule cannot tell apart
    alike: dict[str, list[dict]] = {}
    for s in studies:
        alike.setdefault(public_constants(s["config"]), []).append(s)
    twins = [("corpora with the same public constants", g) for g in alike.values() if len(g) > 1]
    for name, group in [("all corpora", studies)] + twins:
        k, w = best_worst_case(group)
        worst.append({"corpora": [s["corpus"] for s in group], "shape": k, "worst_ratio": w})
        lines.append(f"best worst-case ratio over {name} ({', '.join(s['corpus'] for s in group)}): "
                     f"{w:.3f} ({k})")
    text = "\n".join(lines)
    print(text)
    write_study(Path(args.out), "loco", text, {"studies": studies, "loco": loco, "rule": rule, "worst_case": worst})
    return 0


if __name__ == "__main__":
    sys.exit(main())
