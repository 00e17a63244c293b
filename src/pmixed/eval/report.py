"""Evaluation outputs: JSON, CSV, a Markdown table and PNG plots (matplotlib, headless)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

LABELS = {
    "public": "Pre-trained (public)",
    "finetune": "Fine-tuned (non-private)",
    "dpsgd": "DP-SGD",
    "dpsgd_unit": "DP-SGD per unit",
    "ensemble_avg": "Ensemble average (non-private)",
}


def gain_kept(public: float, private: float, finetuned: float) -> float:
    """(public - private) / (public - fine-tuned): the share of the fine-tuning gain kept."""
    denom = public - finetuned
    return (public - private) / denom if denom else float("nan")


def epsilon_label(epsilon: float, digits: int = 3) -> str:
    """``epsilon`` to ``digits`` significant figures, rounded *up*: a baseline's printed epsilon
    never understates what its accountant reported (8.0014 prints as 8.01, not 8; values within
    1e-12 relative of a printed figure print as that figure)."""
    if not math.isfinite(epsilon) or epsilon <= 0:
        return f"{epsilon:g}"
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(epsilon)))
    up = math.ceil(epsilon * scale * (1 - 1e-12)) / scale  # 1e-12: 7.99 stays 7.99 despite binary noise
    return f"{up:.{digits}g}"


def table_rows(result: dict[str, Any], dpsgd_epsilon: float | None = None) -> list[dict[str, Any]]:
    models = result["models"]
    eps = {"dpsgd": dpsgd_epsilon, **{k: v for k, v in (result.get("baseline_epsilon") or {}).items()
                                       if v is not None}}
    rows = []
    for key in ("public", "finetune", "dpsgd", "dpsgd_unit", "ensemble_avg"):
        if key in models:
            label = LABELS[key]
            if key == "dpsgd_unit" and result.get("unit_name"):
                label = f"DP-SGD per {result['unit_name']}"
            if eps.get(key) is not None:
                label += f" eps={epsilon_label(eps[key])}"
            rows.append({"model": label, "ppl": models[key]["ppl"], "std": None, "key": key})
    for s in result["pmixed"]:
        label = f"PMixED eps={s['epsilon']:g} (N={s['members']}, q={s['sample_rate']:g}, T={s['queries']})"
        if s.get("mechanism") == "adaptive":
            label = (f"screened PMixED eps={s['epsilon']:g} (N={s['members']}, q={s['sample_rate']:g}, "
                     f"T={s['queries']}, {s['private_queries']} private, filter order {s['filter_order']})")
        if s.get("shape_source"):  # how lam_max / tail / alpha were chosen
            label = label[:-1] + f", shape: {s['shape_source']})"
        rows.append({"model": label, "ppl": s["ppl_mean"], "std": s["ppl_std"], "key": "pmixed",
                     "runs": s["runs"]})
    pub = models.get("public", {}).get("ppl")
    ft = models.get("finetune", {}).get("ppl")
    for r in rows:
        r["gain_kept"] = gain_kept(pub, r["ppl"], ft) if pub is not None and ft is not None else None
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | perplexity | share of fine-tuning gain kept |", "|---|---|---|"]
    for r in rows:
        ppl = f"{r['ppl']:.2f}" + (f" ± {r['std']:.2f} ({r['runs']} runs)" if r.get("std") is not None else "")
        g = "" if r.get("gain_kept") is None or r["key"] in ("public", "finetune") else f"{100 * r['gain_kept']:.0f}%"
        lines.append(f"| {r['model']} | {ppl} | {g} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], out_dir: Path, *, stem: str = "eval",
                  dpsgd_epsilon: float | None = None) -> dict[str, Path]:
    """Write ``stem``.json/.csv/.md and ``stem``.png; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = table_rows(result, dpsgd_epsilon)
    paths = {
        "json": out_dir / f"{stem}.json",
        "csv": out_dir / f"{stem}.csv",
        "md": out_dir / f"{stem}.md",
        "png": out_dir / f"{stem}.png",
    }
    paths["json"].write_text(json.dumps(result, indent=2, default=float))
    with paths["csv"].open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["model", "ppl", "ppl_std", "gain_kept"])
        for r in rows:
            w.writerow([r["model"], r["ppl"], "" if r["std"] is None else r["std"],
                        "" if r["gain_kept"] is None else r["gain_kept"]])
    paths["md"].write_text(markdown_table(rows))
    bar_chart(rows, paths["png"])
    if result.get("pmixed"):
        paths["lambda_png"] = out_dir / f"{stem}-lambda.png"
        lambda_chart(result["pmixed"][0], paths["lambda_png"])
    return paths


def percent(x: float | None) -> str:
    """A share as a table cell: "12.3%", or empty when there is none."""
    return "" if x is None else f"{100 * x:.1f}%"


def write_study(out_dir: Path, stem: str, table: str, payload: dict[str, Any], heading: str | None = None) -> None:
    """A benchmark study's outputs: ``stem``.md (``heading``, then the Markdown ``table``) and
    ``stem``.json (``payload``), in ``out_dir`` (created); says where."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(("" if heading is None else f"# {heading}\n\n") + table + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=float))
    print(f"wrote {out_dir}/{stem}.{{md,json}}")


def nonprivate(s: dict[str, Any]) -> dict[str, Any]:
    """A PMixED summary's non-private diagnostics (``diagnostics_nonprivate``; older results
    kept them at the top level)."""
    return s.get("diagnostics_nonprivate") or s


NONPRIVATE_TITLE = "non-private diagnostic (a function of the private members, not covered by epsilon)"


def lambda_chart(s: dict[str, Any], path: Path) -> None:
    """Which bound binds: the mixing weights lambda of the drawn members, the constraint that set
    each one (both non-private diagnostics), and the radius per order (public: docs/privacy.md
    eq. (B2), (K1))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diag = nonprivate(s)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))
    fig.suptitle(f"PMixED mixing weights: {NONPRIVATE_TITLE}", fontsize=10)
    hist = diag.get("lambda_histogram") or []
    if hist:
        edges = [i / len(hist) for i in range(len(hist))]
        axes[0].bar(edges, hist, width=1 / len(hist), align="edge", color="tab:red")
    axes[0].axvline(s["lam_max"], color="k", linestyle="--", label=f"lam_max = {s['lam_max']:g}")
    axes[0].set_xlabel("mixing weight lambda of a drawn member")
    axes[0].set_ylabel("drawn (position, member) pairs")
    axes[0].legend(fontsize=8)
    axes[0].set_title("lambda of drawn members (non-private)", fontsize=9)
    bind = diag.get("binding_constraint", {})
    axes[1].bar(list(bind), list(bind.values()), color="tab:blue")
    axes[1].set_title("constraint that set lambda (non-private)", fontsize=9)
    orders = list(range(2, 2 + len(s["radii"])))
    axes[2].semilogy(orders, s["radii"], marker="o")
    axes[2].set_xticks(orders)
    axes[2].set_xlabel("order k")
    axes[2].set_ylabel("tau_k (moment radius)")
    axes[2].set_title(f"radius per order (public: alpha={s['alpha']}, N={s['members']}, q={s['sample_rate']:g})",
                      fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def zoom_range(vals: list[float], errs: list[float]) -> tuple[float, float]:
    """The x-range of the bar chart: where the models differ (the spread plus margins, room on
    the right for the value labels), not from 0."""
    a = min(v - e for v, e in zip(vals, errs, strict=True))
    b = max(v + e for v, e in zip(vals, errs, strict=True))
    span = max(b - a, 1e-6 * max(abs(b), 1.0))
    return max(0.0, a - 0.15 * span), b + 0.35 * span


def bar_chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    names = [r["model"] for r in rows][::-1]
    vals = [r["ppl"] for r in rows][::-1]
    errs = [r["std"] or 0.0 for r in rows][::-1]
    colors = ["tab:red" if r["key"] == "pmixed" else "tab:gray" if r["key"] == "public" else "tab:blue"
              for r in rows][::-1]
    lo, hi = zoom_range(vals, errs)
    ax.barh(names, [v - lo for v in vals], left=lo, xerr=errs, color=colors)
    for i, v in enumerate(vals):
        ax.text(v + errs[i], i, f" {v:.2f}", va="center")
    ax.set_xlabel(f"test perplexity (lower is better; the axis starts at {lo:g}, not 0)")
    ax.set_xlim(lo, hi)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SWEEP_HEADER = ["param", "value", "epsilon", "members", "queries", "alpha", "epsilon_order",
                "sample_rate", "lam_max", "tail", "ppl_mean", "ppl_std", "nonprivate_mean_lambda",
                "nonprivate_empty_draw_fraction", "mechanism"]


def _sweep_rows(points: list[dict[str, Any]]) -> list[list[Any]]:
    # alpha: the largest order the projection enforces (the config's / the sweep's alpha);
    # epsilon_order: the order at which the RDP-to-DP conversion attains epsilon;
    # nonprivate_*: non-private diagnostics (functions of the private members)
    rows = []
    for s in points:
        d = nonprivate(s)
        d = {k: d.get(k, float("nan")) for k in ("mean_lambda", "empty_draw_fraction")}
        for param, value in s["sweep"].items():
            rows.append([param, value, s["epsilon"], s["members"], s["queries"], s["max_order"], s["alpha"],
                         s["sample_rate"], s["lam_max"], s["tail"], s["ppl_mean"], s["ppl_std"],
                         d["mean_lambda"], d["empty_draw_fraction"], s.get("mechanism", "pmixed")])
    return rows


def sweep_outputs(result: dict[str, Any], out_dir: Path, *, stem: str = "sweep") -> dict[str, Path]:
    """Per swept parameter P: ``stem-P.json`` (the points of P), ``stem-P.csv`` and a PNG line
    plot ``stem-P.png`` with the public, fine-tuned and DP-SGD levels drawn in. A sweep of one
    parameter never touches another's files; ``stem.csv`` is rebuilt from every ``stem-*.csv``
    in the folder (all parameters swept so far)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    by_param: dict[str, list[dict[str, Any]]] = {}
    for s in result["pmixed"]:
        for param in s["sweep"]:
            by_param.setdefault(param, []).append(s)
    for param, points in by_param.items():
        paths[f"{param}_json"] = out_dir / f"{stem}-{param}.json"
        paths[f"{param}_json"].write_text(json.dumps({**result, "pmixed": points}, indent=2, default=float))
        paths[f"{param}_csv"] = out_dir / f"{stem}-{param}.csv"
        with paths[f"{param}_csv"].open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(SWEEP_HEADER)
            w.writerows(_sweep_rows(points))
        paths[param] = out_dir / f"{stem}-{param}.png"
        sweep_plot(result, param, points, paths[param])
        plt.close("all")
    paths["csv"] = out_dir / f"{stem}.csv"
    with paths["csv"].open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(SWEEP_HEADER)
        for part in sorted(out_dir.glob(f"{stem}-*.csv")):
            with part.open(newline="") as src:
                rows = list(csv.reader(src))
            if rows and rows[0] == SWEEP_HEADER:
                w.writerows(rows[1:])
    return paths


def sweep_plot(result: dict[str, Any], param: str, points: list[dict[str, Any]], path: Path) -> None:
    """PMixED perplexity against one swept parameter; the baselines as labelled levels (on the
    epsilon plot, a DP-SGD baseline is a labelled point at its own epsilon)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    eps = result.get("baseline_epsilon") or {}
    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs: list[float] = []
    for mech, color, label in (("pmixed", "tab:red", "PMixED"), ("adaptive", "tab:purple", "screened PMixED")):
        pts = sorted((float(s["sweep"][param]), s["ppl_mean"], s["ppl_std"]) for s in points
                     if s.get("mechanism", "pmixed") == mech)
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        color=color, label=label)
            xs = sorted(set(xs) | {p[0] for p in pts})
    for key, style, color in (("public", "--", "k"), ("finetune", ":", "k"), ("dpsgd", "-.", "tab:blue"),
                              ("dpsgd_unit", "-.", "tab:green")):
        if key not in models:
            continue
        ppl = models[key]["ppl"]
        label = LABELS[key]
        if eps.get(key) is not None:
            label += f" eps={epsilon_label(eps[key])}"
        if param == "epsilon" and eps.get(key) is not None:
            ax.plot([eps[key]], [ppl], marker="s", linestyle="none", color=color, label=f"{label} (one model)")
            ax.annotate(label, (eps[key], ppl), textcoords="offset points", xytext=(5, 5), fontsize=7, color=color)
        else:
            ax.axhline(ppl, linestyle=style, color=color, label=label)
            ax.annotate(label, (1.0, ppl), xycoords=("axes fraction", "data"), textcoords="offset points",
                        xytext=(-3, 3), ha="right", fontsize=7, color=color)
    ax.set_xlabel(param)
    ax.set_ylabel("test perplexity")
    if param in ("queries", "members", "private_queries") or (param == "sample_rate" and max(xs) / min(xs) > 8):
        ax.set_xscale("log")
    if param in ("queries", "members", "alpha", "private_queries"):  # plain integer ticks at the swept values
        ax.minorticks_off()
        ax.set_xticks(xs, [f"{int(x)}" for x in xs])
    ax.legend(fontsize=7)
    ax.set_title(f"PMixED perplexity vs {param}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
