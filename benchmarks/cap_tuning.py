"""The cap-statistic tuner (`pmixed tune`, the default method; eq. (H4)) against the default rule,
after paying for the tuning.

    python benchmarks/cap_tuning.py --config configs/quick.toml --config configs/quick-president.toml \
        --config configs/quick-mail.toml --config configs/smollm2-sotu-speech-cpu.toml [--repeats 200] [--runs 4] [--out docs/examples/cap-tuning]

For every trained config (epsilon 8, delta 1e-5, T = 1024 from the config) and every eps_s of
``--score-epsilon``: the tuner's plan (the rule's shape as reference, three candidates: lam_max
0.25, the rule's 0.5 and 0.75, all calibrated after the tuning's curve (H4)), the members' cap
shares on the public positions (texts sampled from the public model), then ``--repeats`` tunings in experiment mode
(each a fresh Laplace draw on the same shares: the tuner's only randomness once the positions are
fixed). Every candidate is served in what the tuning left and scored on the config's evaluation
blocks with ``--runs`` runs, beside the default rule (no tuning, no charge) and the best shape of
the default-rule study's grid (unaccounted, from docs/examples/default-rule/loco.json when it is
there). Reported: the tuned share after paying (mean over the repeats), how often each candidate
was picked, the tuning's epsilon alone, and the members' mean cap share (a non-private
diagnostic of the shipped public corpora: a deployment releases only its noisy value).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pmixed.eval.report import percent, write_study


def study(config: str, score_epsilons: list[float], repeats: int, runs: int, public_blocks: int) -> dict:
    import torch

    from pmixed.config import load_run_config
    from pmixed.eval.perplexity import make_setup, run_evaluation
    from pmixed.eval.report import gain_kept
    from pmixed.eval.runner import eval_blocks, load_runtime
    from pmixed.eval.tuning import bind_plan, cap_shares, tune_bind
    from pmixed.eval.tuning import public_blocks as sample_public
    from pmixed.privacy.accountant import DEFAULT_ORDERS
    from pmixed.privacy.calibration import DEFAULT_LAM_MAX, DEFAULT_TAIL
    from pmixed.privacy.conversion import rdp_to_epsilon
    from pmixed.privacy.ledger import MEMORY, Ledger

    cfg = load_run_config(Path(config), None)
    p = cfg.privacy
    N = cfg.data.n_parts
    ens, rt = load_runtime(cfg, progress=False)
    L = min(cfg.eval.block_size, rt.context_length or cfg.eval.block_size)
    tok = ens.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else (tok.eos_token_id or 0)
    t0 = time.perf_counter()
    texts = sample_public(rt, public_blocks, L, start)
    base = dict(epsilon=p.epsilon, delta=p.delta, query_budget=p.queries, ensemble_size=N, sample_rate=p.sample_rate)
    setups = [make_setup("rule", runs=runs, lam_max=DEFAULT_LAM_MAX, tail=DEFAULT_TAIL, alpha=None, **base)]
    per_eps = []
    for si, eps_s in enumerate(score_epsilons):
        params, cands = bind_plan(cfg, texts.shape[0] * (texts.shape[1] - 1), eps_s)
        spent = dict(zip(DEFAULT_ORDERS, params.curve(DEFAULT_ORDERS)))
        shares = cap_shares(rt, texts, params.reference)
        picks = {lm: 0 for lm in cands}
        for r in range(repeats):
            led = Ledger(MEMORY, epsilon=p.epsilon, delta=p.delta)
            res = tune_bind(rt, texts, params, cands, led, generator=torch.Generator().manual_seed(1000 * si + r),
                            shares=shares)
            picks[res.chosen.lam_max] += 1
        for lm, c in cands.items():
            kw = dict(base, lam_max=lm, tail=c.tail, alpha=c.calibration.params.max_order)
            setups.append(make_setup(f"e{si} paid {lm:g}", runs=runs, spent=spent, **kw))
        per_eps.append({"score_epsilon": eps_s, "tuning_epsilon": rdp_to_epsilon(DEFAULT_ORDERS, list(spent.values()),
                                                                                   p.delta)[0],
                        "picks": {f"{lm:g}": k for lm, k in picks.items()},
                        "cap_share_nonprivate": float(shares.mean()), "noise_scale": params.noise_scale,
                        "orders": {f"{lm:g}": c.calibration.params.max_order for lm, c in cands.items()}})
    tune_seconds = time.perf_counter() - t0
    extras = tuple(n for n in ("finetune", "dpsgd_unit") if n in rt.extra_index)
    res = run_evaluation(rt, eval_blocks(ens, cfg), setups, extras=extras, seed=cfg.eval.seed, progress=False,
                         average=False, chunk=cfg.eval.chunk_for(rt.device.type))
    pub, ft = res.models["public"]["ppl"], res.models["finetune"]["ppl"]
    dp = res.models.get("dpsgd_unit", {}).get("ppl")
    share = {s["name"]: gain_kept(pub, s["ppl_mean"], ft) for s in res.pmixed}
    for si, e in enumerate(per_eps):
        e["paid"] = {lm: share[f"e{si} paid {lm}"] for lm in e["picks"]}
        e["tuned_share"] = sum(e["paid"][lm] * k for lm, k in e["picks"].items()) / repeats
    best = None
    grid_file = Path("docs/examples/default-rule/loco.json")
    if grid_file.is_file():
        for s in json.loads(grid_file.read_text())["studies"]:
            if Path(s["config"]).name == Path(config).name:
                k = max(s["grid"], key=s["grid"].get)
                best = {"shape": k, "share": s["grid"][k]}
    return {"config": config, "corpus": f"{cfg.data.source} per {cfg.data.unit}", "N": N, "public": pub,
            "finetune": ft, "rule": share["rule"], "dpsgd_unit": None if dp is None else gain_kept(pub, dp, ft),
            "best_unaccounted": best, "public_positions": texts.shape[0] * (texts.shape[1] - 1),
            "per_score_epsilon": per_eps, "tune_seconds": tune_seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--score-epsilon", type=float, action="append")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--public-blocks", type=int, default=8)
    ap.add_argument("--out", default="docs/examples/cap-tuning")
    args = ap.parse_args(argv)
    eps = args.score_epsilon or [0.25, 0.5]
    studies = [study(c, eps, args.repeats, args.runs, args.public_blocks) for c in args.config]
    lines = ["| corpus (unit) | N | eps_s | tuning's epsilon alone | picked lam_max 0.25 / 0.5 / 0.75 | after paying: "
             "0.25 / 0.5 / 0.75 | **tuned, after paying** | default rule (no tuning) | best shape, unaccounted | "
             "DP-SGD per unit | mean cap share (non-private diagnostic) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in studies:
        b = s["best_unaccounted"]
        for e in s["per_score_epsilon"]:
            lines.append(f"| {s['corpus']} | {s['N']} | {e['score_epsilon']:g} | {e['tuning_epsilon']:.2f} | "
                         f"{' / '.join(str(e['picks'][k]) for k in ('0.25', '0.5', '0.75'))} | "
                         f"{' / '.join(percent(e['paid'][k]) for k in ('0.25', '0.5', '0.75'))} | "
                         f"**{percent(e['tuned_share'])}** | {percent(s['rule'])} | "
                         f"{'' if b is None else percent(b['share']) + ' (' + b['shape'] + ')'} | {percent(s['dpsgd_unit'])} | "
                         f"{e['cap_share_nonprivate']:.3f} |")
    text = "\n".join(lines)
    print(text)
    write_study(Path(args.out), "cap_tuning", text, {"studies": studies, "repeats": args.repeats, "runs": args.runs},
                f"the cap-statistic tuner vs the default rule, epsilon 8 in all (tuning included), {args.repeats} "
                f"tunings, {args.runs} runs each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
