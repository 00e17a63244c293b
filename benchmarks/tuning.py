"""Accounted tuning (`pmixed tune`) against the default rule, after paying for the tuning.

    python benchmarks/tuning.py --config configs/quick.toml --config configs/quick-president.toml \
        --config configs/quick-mail.toml [--repeats 20] [--runs 4] [--out docs/examples/tuning]

For every trained config (epsilon 8, delta 1e-5, T = 1024 from the config; the held-out units
are the tuning set): the tuner's plan (16 candidates (tail, lam_max) at one common order, the
tuning's RDP curve (H3)) for each tuner setting, then ``--repeats`` independent tunings in
experiment mode on one pass of the members over the tuning positions. Each chosen shape is
served in what the tuning left (calibrate(spent=...)) and scored on the config's evaluation
blocks with ``--runs`` runs. Reported per config: the default rule's gain share (no tuning, no
charge), the best candidate's share without paying (an unaccounted sweep), the tuned share after
paying (mean over the repeats), the epsilon the tuning alone spends, and how often the tuner
picked the candidate that is best after paying. The evaluation blocks come from the same held-out
units as the tuning positions (the tuner's output is DP, so what it can overfit is bounded; the
rule is not chosen on them at all).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pmixed.eval.report import percent, write_study

SETTINGS = ({"per_unit": 16, "score_epsilon": 1.0, "eta": 1.0, "gamma": 0.5},
            {"per_unit": 4, "score_epsilon": 0.5, "eta": 1.0, "gamma": 0.5},
            {"per_unit": 1, "score_epsilon": 0.25, "eta": 1.0, "gamma": 0.5})


def study(config: str, repeats: int, runs: int) -> dict:
    import torch

    from pmixed.config import load_run_config
    from pmixed.errors import ConfigError
    from pmixed.eval.perplexity import make_setup, run_evaluation
    from pmixed.eval.report import gain_kept
    from pmixed.eval.runner import eval_blocks, load_runtime
    from pmixed.eval.tuning import plan, serving_calibration, tune, tuning_stats, unit_blocks
    from pmixed.privacy.accountant import DEFAULT_ORDERS
    from pmixed.privacy.calibration import DEFAULT_LAM_MAX, DEFAULT_TAIL
    from pmixed.privacy.conversion import rdp_to_epsilon
    from pmixed.privacy.ledger import MEMORY, Ledger

    cfg = load_run_config(Path(config), None)
    p = cfg.privacy
    N = cfg.data.n_parts
    ens, rt = load_runtime(cfg, progress=False)
    tune_blocks = unit_blocks(ens, cfg.eval.block_size, rt.context_length)
    blocks = eval_blocks(ens, cfg)
    base = dict(epsilon=p.epsilon, delta=p.delta, query_budget=p.queries, ensemble_size=N, sample_rate=p.sample_rate)
    setups = [make_setup("rule", runs=runs, lam_max=DEFAULT_LAM_MAX, tail=DEFAULT_TAIL, alpha=None, **base)]
    per_setting = []
    for si, st in enumerate(SETTINGS):
        try:
            cands, params = plan(cfg, len(tune_blocks), st["per_unit"], st["score_epsilon"], st["eta"], st["gamma"])
        except ConfigError as err:
            per_setting.append({**st, "infeasible": str(err)})
            continue
        curve = params.curve(DEFAULT_ORDERS)
        spent = dict(zip(DEFAULT_ORDERS, curve))
        tuning_eps = rdp_to_epsilon(DEFAULT_ORDERS, curve, p.delta)[0]
        stats = tuning_stats(rt, tune_blocks, st["per_unit"], max(c.calibration.params.max_order for c in cands))
        picks: dict[str, int] = {}
        for r in range(repeats):
            led = Ledger(MEMORY, epsilon=p.epsilon, delta=p.delta)
            res = tune(rt, tune_blocks, cands, params, led, generator=torch.Generator().manual_seed(1000 * si + r),
                       stats=stats)
            picks[res.chosen.label] = picks.get(res.chosen.label, 0) + 1
        for c in cands:  # every candidate: unaccounted (full budget, same order) and after paying
            kw = dict(base, lam_max=c.lam_max, tail=c.tail, alpha=c.calibration.params.max_order)
            setups.append(make_setup(f"s{si} free {c.label}", runs=runs, **kw))
            try:
                serving_calibration(cfg, c, spent)
                setups.append(make_setup(f"s{si} paid {c.label}", runs=runs, spent=spent, **kw))
            except ConfigError:
                pass
        per_setting.append({**st, "tuning_epsilon": tuning_eps, "order": cands[0].calibration.params.max_order,
                            "units": len(tune_blocks), "picks": picks, "labels": [c.label for c in cands]})
    t0 = time.perf_counter()
    extras = tuple(n for n in ("finetune", "dpsgd_unit") if n in rt.extra_index)
    res = run_evaluation(rt, blocks, setups, extras=extras, seed=cfg.eval.seed, progress=False, average=False,
                         chunk=cfg.eval.chunk_for(rt.device.type))
    pub, ft = res.models["public"]["ppl"], res.models["finetune"]["ppl"]
    dp = res.models.get("dpsgd_unit", {}).get("ppl")
    shares = {}
    for s in res.pmixed:
        shares[s["name"]] = gain_kept(pub, s["ppl_mean"], ft)
    out = {"config": config, "corpus": f"{cfg.data.source} per {cfg.data.unit}", "N": N, "public": pub,
           "finetune": ft, "rule": shares["rule"], "dpsgd_unit": None if dp is None else gain_kept(pub, dp, ft),
           "settings": [], "seconds": time.perf_counter() - t0}
    for si, st in enumerate(per_setting):
        if "infeasible" in st:
            out["settings"].append(st)
            continue
        free = {lab: shares[f"s{si} free {lab}"] for lab in st["labels"]}
        paid = {lab: shares.get(f"s{si} paid {lab}", float("nan")) for lab in st["labels"]}
        n = sum(st["picks"].values())
        tuned = sum(paid[lab] * k for lab, k in st["picks"].items()) / n
        best_paid = max(paid, key=lambda k: paid[k])
        out["settings"].append({**st, "free": free, "paid": paid, "tuned_share": tuned,
                                "best_free": max(free.values()), "best_free_shape": max(free, key=free.get),
                                "best_paid": paid[best_paid], "best_paid_picked": st["picks"].get(best_paid, 0) / n})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--out", default="docs/examples/tuning")
    args = ap.parse_args(argv)
    studies = [study(c, args.repeats, args.runs) for c in args.config]
    lines = ["| corpus (unit) | tuner: m positions/unit, eps_s, E[trials] | tuning's epsilon alone | default rule (no tuning) "
             "| best shape, unaccounted | best shape after paying (a selector that knew) | tuned, after paying (mean of "
             "repeats) | picked the best-after-paying shape | DP-SGD per unit |", "|---|---|---|---|---|---|---|---|---|"]
    for s in studies:
        for st in s["settings"]:
            head = f"| {s['corpus']} ({s['N']} parts) | m={st['per_unit']}, eps_s={st['score_epsilon']:g}, E[K]={1 / st['gamma']:g} |"
            if "infeasible" in st:
                lines.append(f"{head} does not fit | {100 * s['rule']:.1f}% | | | infeasible | | {percent(s['dpsgd_unit'])} |")
                continue
            lines.append(f"{head} {st['tuning_epsilon']:.2f} (order {st['order']}, {st['units']} units) | "
                         f"{100 * s['rule']:.1f}% | {100 * st['best_free']:.1f}% ({st['best_free_shape']}) | "
                         f"{100 * st['best_paid']:.1f}% | "
                         f"**{100 * st['tuned_share']:.1f}%** | {100 * st['best_paid_picked']:.0f}% | "
                         f"{percent(s['dpsgd_unit'])} |")
    text = "\n".join(lines)
    print(text)
    write_study(Path(args.out), "tuning", text, {"studies": studies, "repeats": args.repeats, "runs": args.runs},
                f"accounted tuning vs the default rule, epsilon 8 in all (tuning included), {args.repeats} tunings, "
                f"{args.runs} runs each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
