"""`pmixed privacy ...` commands: plan a budget, count the queries that fit, show a ledger."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import typer

from pmixed.errors import ConfigError

app = typer.Typer(no_args_is_help=True)


def _check_inputs(epsilon, delta, queries, ensemble_size, sample_rate, alpha, lam_max) -> None:
    """One-line errors naming the field, before any computation."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ConfigError("epsilon", f"must be > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ConfigError("delta", f"must lie in (0, 1), got {delta}")
    if queries is not None and queries < 1:
        raise ConfigError("queries", f"must be >= 1, got {queries}")
    if ensemble_size < 1:
        raise ConfigError("ensemble-size", f"must be >= 1, got {ensemble_size}")
    if not 0 < sample_rate <= 1:
        raise ConfigError("sample-rate", f"must lie in (0, 1], got {sample_rate}")
    if alpha is not None and not alpha > 1:
        raise ConfigError("alpha", f"must be > 1, got {alpha}")
    if not 0 < lam_max <= 1:
        raise ConfigError("lam-max", f"must lie in (0, 1], got {lam_max}")


def plan_dict(epsilon, delta, queries, ensemble_size, sample_rate, alpha=None, lam_max=None) -> dict:
    """The plan as a JSON-ready dict (also used by the evaluation's reports)."""
    from pmixed.privacy.calibration import (
        DEFAULT_LAM_MAX,
        DEFAULT_TAIL,
        calibrate,
        max_queries,
        scale_of,
    )
    from pmixed.privacy.mixture_bound import floor_weight, member_weight, query_rdp

    lam_max = DEFAULT_LAM_MAX if lam_max is None else lam_max
    order = None if alpha is None else int(alpha) if float(alpha).is_integer() else alpha
    cal = calibrate(epsilon=epsilon, delta=delta, query_budget=queries, ensemble_size=ensemble_size,
                    sample_rate=sample_rate, alpha=order, lam_max=lam_max)
    p = cal.params
    orders = list(range(2, p.max_order + 1))
    return {
        "adjacency": "replace-one-part",
        "epsilon_target": epsilon,
        "delta": delta,
        "queries": queries,
        "ensemble_size": ensemble_size,
        "sample_rate": sample_rate,
        "chosen_order": cal.alpha,
        "max_enforced_order": p.max_order,
        "per_query_rdp": {str(a): query_rdp(a, p) for a in orders},
        "lam_max": p.lam_max,
        "tail": DEFAULT_TAIL,
        "gaussian_scale_t": scale_of(p),
        "radius_per_order": {
            str(k): {"tau": p.tau(k), "renyi_bound": p.renyi_radius(k)} for k in orders
        },
        "member_weight_c": member_weight(ensemble_size, sample_rate),
        "floor_weight_gamma": floor_weight(ensemble_size, sample_rate, p.lam_max),
        "expected_members_per_query": p.expected_members(),
        "probability_no_member": (1 - sample_rate) ** ensemble_size,
        "epsilon_after_queries": cal.epsilon_after(queries),
        "max_queries_within_target": max_queries(p, epsilon, delta),
    }


@app.command("plan")
def plan(
    epsilon: float = typer.Option(..., help="Target epsilon after all queries."),
    delta: float = typer.Option(..., help="Target delta."),
    queries: int = typer.Option(..., help="Query budget T (tokens released) the mechanism is calibrated for."),
    ensemble_size: int = typer.Option(..., "--ensemble-size", help="N, the number of members."),
    sample_rate: float = typer.Option(..., "--sample-rate", help="q, each member's inclusion probability."),
    max_order: float | None = typer.Option(
        None, "--max-order", "--alpha",
        help="The largest Renyi order the ball is enforced at ([privacy] alpha; integer >= 2); default: the "
             "library picks. The order the epsilon conversion uses is printed separately."),
    lam_max: float | None = typer.Option(None, "--lam-max", help="Cap on each member's mixing weight."),
    max_queries_flag: bool = typer.Option(
        False, "--max-queries",
        help="Answer how many queries the mechanism calibrated for T affords at other targets (--at-epsilon)."),
    at_epsilon: list[float] = typer.Option(
        [], "--at-epsilon", help="Targets for --max-queries (repeatable; default: epsilon/4, /2, x1, x2)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Calibrate the mechanism for (epsilon, delta, T, N, q) and show what it will charge."""
    from pmixed.privacy.calibration import DEFAULT_LAM_MAX

    lam = DEFAULT_LAM_MAX if lam_max is None else lam_max
    _check_inputs(epsilon, delta, queries, ensemble_size, sample_rate, max_order, lam)
    if max_order is not None and not float(max_order).is_integer():
        raise ConfigError("max-order", f"must be an integer order, got {max_order}")
    for e in at_epsilon:
        if not (e > 0 and math.isfinite(e)):
            raise ConfigError("at-epsilon", f"must be > 0, got {e}")
    d = plan_dict(epsilon, delta, queries, ensemble_size, sample_rate, max_order, lam)
    if max_queries_flag:
        from pmixed.privacy.calibration import calibrate, max_queries

        cal = calibrate(epsilon=epsilon, delta=delta, query_budget=queries, ensemble_size=ensemble_size,
                        sample_rate=sample_rate, alpha=None if max_order is None else int(max_order), lam_max=lam)
        targets = sorted(set(at_epsilon or [epsilon / 4, epsilon / 2, epsilon, 2 * epsilon]))
        fits = {e: max_queries(cal.params, e, delta) for e in targets}
        if as_json:
            typer.echo(json.dumps({"calibrated_for_queries": queries, "delta": delta,
                                   "max_queries_at_epsilon": {f"{e:g}": n for e, n in fits.items()}}, indent=2))
            return
        typer.echo(f"the mechanism calibrated for T={queries} queries at epsilon={epsilon:g} (delta={delta:g}, "
                   f"N={ensemble_size}, q={sample_rate:g}) affords:")
        for e, n in fits.items():
            typer.echo(f"  epsilon {e:g}: {n} queries")
        return
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    console.print(
        f"[bold]PMixED privacy plan[/bold] (adjacency: replace one part)  epsilon={epsilon} delta={delta} "
        f"T={d['queries']} N={ensemble_size} q={sample_rate}"
    )
    console.print(
        f"ball enforced at orders 2..{d['max_enforced_order']} (--max-order; \\[privacy] alpha); "
        f"lam_max = {d['lam_max']}, tail = {d['tail']:g} (the default rule's), Gaussian-shape scale t = "
        f"{d['gaussian_scale_t']:.4g}"
    )
    console.print(f"the RDP-to-DP conversion attains epsilon at order {d['chosen_order']}")
    table = Table("order k", "per-query RDP", "tau_k (moment radius)", "D_k(pbar||p0) <=", box=box.MARKDOWN)
    for k, rad in d["radius_per_order"].items():
        table.add_row(k, f"{d['per_query_rdp'][k]:.6g}", f"{rad['tau']:.6g}", f"{rad['renyi_bound']:.4g}")
    console.print(table)
    console.print(
        f"expected members per query = {d['expected_members_per_query']:.3g} "
        f"(P(no member) = {d['probability_no_member']:.3g}); member weight c = {d['member_weight_c']:.4g}, "
        f"floor gamma = {d['floor_weight_gamma']:.4g}"
    )
    console.print(
        f"epsilon after {d['queries']} queries = [bold]{d['epsilon_after_queries']:.10g}[/bold] "
        f"(target {epsilon}); at most {d['max_queries_within_target']} queries fit the target"
    )


# ----------------------------------------------------------------------------- a ledger's state


def queries_left(ledger, rdp: Sequence[float]) -> int:
    """How many more queries with the per-query RDP curve ``rdp`` (at ``ledger.orders``) the
    ledger's budget affords now (``Ledger.queries_left`` where the ledger has it)."""
    if hasattr(ledger, "queries_left"):
        return int(ledger.queries_left(rdp))
    from pmixed.privacy.accountant import compose_curve, curve_epsilon

    spent, orders, delta, limit = ledger.spent_rdp(), ledger.orders, ledger.delta, ledger.epsilon

    def fits(k: int) -> bool:
        return curve_epsilon(orders, compose_curve(spent, rdp, k), delta) <= limit

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 40:  # a free query (rdp 0 everywhere): unbounded
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def ledger_hint(path) -> str:
    """How a CLI user starts a new budget (or keeps the file's)."""
    return (f"from the CLI: a new budget needs a new --ledger path (or delete {path}); "
            f"`pmixed privacy status --ledger {path}` shows the file's budget")


def ledger_summary(ledger, per_query_rdp: Sequence[float] | None = None) -> dict:
    """Spent, limit, remaining, the history by label and, given a per-query RDP curve, the
    queries the budget still affords."""
    from pmixed.privacy.ledger import REFUND, record_count

    by_label: dict[str, dict[str, int]] = {}
    for rec in ledger.history():  # queries net of refunds (a reservation's untaken part)
        e = by_label.setdefault(rec.label or "(no label)", {"charges": 0, "refunds": 0, "queries": 0})
        e["refunds" if rec.mechanism == REFUND else "charges"] += 1
        e["queries"] += record_count(rec)
    out = {
        "ledger": str(ledger.path),
        "epsilon_limit": ledger.epsilon,
        "delta": ledger.delta,
        "epsilon_spent": ledger.epsilon_spent(),
        "epsilon_remaining": ledger.remaining(),
        "acceptance_rule": ledger.rule.name,
        "charges": ledger.charges(),
        "queries": sum(e["queries"] for e in by_label.values()),
        "by_label": by_label,
        "created_at": ledger.created_at,
        "package_version": ledger.package_version,
    }
    if per_query_rdp is not None:
        out["queries_left"] = queries_left(ledger, per_query_rdp)
    return out


@app.command("status")
def status(
    ledger: Path = typer.Option(..., "--ledger", help="The ledger file (never created by this command)."),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Run configuration: count the queries left at its per-query cost."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a ledger: spent, limit and remaining epsilon, its history by label and, with
    --config, how many more queries (tokens) of that config the budget affords."""
    from pmixed.errors import LedgerError
    from pmixed.privacy.ledger import Ledger

    if not ledger.is_file():
        raise LedgerError(f"no ledger at {ledger} (a ledger is created by the first charge, e.g. "
                          "`pmixed generate --ledger FILE`)")
    cfg = None
    if config is not None:
        from pmixed.config import load_run_config

        cfg = load_run_config(config)
    with Ledger.open(ledger) as led:
        rdp = None
        adaptive = cfg is not None and cfg.privacy.mechanism == "adaptive"
        if adaptive:  # the budget's unit is one screen round and its private answer
            from pmixed.mechanism.adaptive import AdaptivePMixED

            rdp = AdaptivePMixED.from_config(cfg.privacy, cfg.data.n_parts).charge(led.orders).rdp
        elif cfg is not None:
            from pmixed.mechanism.pmixed import PMixED

            rdp = PMixED.from_config(cfg.privacy, cfg.data.n_parts).query_rdp(led.orders)
        d = ledger_summary(led, rdp)
    if cfg is not None:
        d["config"] = str(config)
        d["config_budget_matches"] = (cfg.privacy.epsilon == d["epsilon_limit"] and cfg.privacy.delta == d["delta"])
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    typer.echo(f"ledger {d['ledger']} (created {d['created_at']}, pmixed {d['package_version']})")
    typer.echo(f"epsilon spent {d['epsilon_spent']:.6g} of limit {d['epsilon_limit']:g} at delta "
               f"{d['delta']:g}; remaining {d['epsilon_remaining']:.6g} (acceptance rule {d['acceptance_rule']})")
    labels = ", ".join(f"{k}: {v['charges']} charges, {v['queries']} queries" for k, v in sorted(d["by_label"].items()))
    typer.echo(f"history: {d['charges']} charges, {d['queries']} queries" + (f" ({labels})" if labels else ""))
    if adaptive:
        typer.echo(f"units left under the Renyi filter at {config}'s cost (a unit: one screen round and its one "
                   f"private answer; the screen's public answers between units cost nothing more): {d['queries_left']}")
    elif cfg is not None:
        typer.echo(f"queries left at {config}'s per-query cost (N={cfg.data.n_parts}, "
                   f"q={cfg.privacy.sample_rate:g}, T={cfg.privacy.queries}): {d['queries_left']}")
        if not d["config_budget_matches"]:
            typer.echo(f"note: the config's budget (epsilon {cfg.privacy.epsilon:g}, delta {cfg.privacy.delta:g}) "
                       "is not this ledger's; `pmixed generate` with this config refuses this file")
