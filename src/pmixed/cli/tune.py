"""`pmixed tune`: choose the PMixED shape on the held-out units, paid from the deployment's budget
(docs/privacy.md section 12; eqs. (H1)-(H3))."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer

from pmixed.cli.evaluate import (
    ConfigOpt,
    QuietOpt,
    _console,
    announce_long_steps,
    check_seed,
    silence_third_party,
)
from pmixed.config import load_run_config


def _floats(field: str, text: str) -> list[float]:
    from pmixed.errors import ConfigError

    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ConfigError(field, f"must be comma-separated numbers: {err}") from None
    if not vals:
        raise ConfigError(field, "no values given")
    return vals


#: Each option's default under the method that reads it. The options themselves default to None
#: ("not given"), so that one the chosen method does not read is refused instead of ignored.
DEFAULTS = {"--public-blocks": 8, "--positions-per-unit": 16, "--gamma": 0.5, "--eta": 1.0,
            "--tails": "1,3,10,30", "--lam-max": "0.25,0.5,0.75,0.9"}
#: --score-epsilon's default by method.
SCORE_EPSILON = {"bind": 0.5, "trials": 1.0}


def tune_cmd(
    config: Path = ConfigOpt,
    ledger: str | None = typer.Option(
        None, "--ledger", help="The deployment's ledger the tuning is charged to: a file or a postgresql:// URL "
                               "(default: <output_dir>/ledgers/serve.ledger, the one `pmixed serve` uses)."),
    experiment: bool = typer.Option(
        False, "--experiment", help="Charge a fresh in-memory ledger instead (nothing durable); required by --seed."),
    seed: int | None = typer.Option(None, "--seed", help="Seed every draw: only with --experiment (not a private release)."),
    method: str = typer.Option(
        "bind", "--method", help="bind: lam_max from one noisy statistic of the members on public positions, eq. (H4) "
                                 "(cheap); trials: the best of random trials on the held-out units, eqs. (H1)-(H3)."),
    public_blocks: int | None = typer.Option(
        None, "--public-blocks", min=1, help="bind: texts sampled from the public model whose positions are scored "
                                             f"(default {DEFAULTS['--public-blocks']})."),
    per_unit: int | None = typer.Option(
        None, "--positions-per-unit", min=1,
        help="trials: scored positions queried per held-out unit (m: the hit count's sensitivity; "
             f"default {DEFAULTS['--positions-per-unit']})."),
    score_epsilon: float | None = typer.Option(
        None, "--score-epsilon", help=f"Pure epsilon of the noisy statistic (bind, default {SCORE_EPSILON['bind']:g}) or of "
                                      f"each trial's noisy hit count (trials, default {SCORE_EPSILON['trials']:g})."),
    gamma: float | None = typer.Option(
        None, "--gamma", help="trials: trial-count law D_{eta,gamma}: E[K] = 1/gamma at eta = 1 "
                                 f"(default {DEFAULTS['--gamma']:g})."),
    eta: float | None = typer.Option(None, "--eta", help="trials: trial-count law D_{eta,gamma} (1: geometric; "
                                                          f"default {DEFAULTS['--eta']:g})."),
    tails: str | None = typer.Option(None, "--tails", help="trials: candidate tails s (comma-separated; "
                                                            f"default {DEFAULTS['--tails']})."),
    lam_max: str | None = typer.Option(
        None, "--lam-max", help=f"trials: candidate lam_max (comma-separated; default {DEFAULTS['--lam-max']})."),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="Override [run] output_dir."),
    quiet: bool = QuietOpt,
) -> None:
    """Choose the PMixED shape with a private selection whose whole cost is charged to the ledger
    before any member runs: by default lam_max from the members' noisy cap share on public
    positions (eq. (H4)); with --method trials, lam_max and tail on the held-out units (Papernot &
    Steinke). Prints the chosen shape, what the tuning spent and the serving calibration in what is
    left."""
    import torch

    from pmixed.cli.privacy import ledger_hint
    from pmixed.cli.serve import _shown
    from pmixed.errors import BudgetExhausted, ConfigError, DataError, LedgerError
    from pmixed.eval.runner import check_ensemble_matches, load_runtime
    from pmixed.eval.tuning import (
        bind_plan,
        candidates,
        held_out_units,
        plan,
        serving_calibration,
        start_token,
        tune,
        tune_bind,
        unit_blocks,
    )
    from pmixed.eval.tuning import public_blocks as public_blocks_of
    from pmixed.privacy.acceptance import RenyiFilterRule
    from pmixed.privacy.calibration import scale_of
    from pmixed.privacy.ledger import MEMORY, Ledger
    from pmixed.privacy.tuning import (
        bind_charge,
        check_trials,
        expected_trials,
        laplace_rdp,
        tuning_charge,
    )

    if quiet:
        silence_third_party()
    cfg = load_run_config(config, output_dir)
    check_seed(seed, experiment, ledger)
    p = cfg.privacy
    if p.tuning is not None:
        raise ConfigError("privacy.tuning", "this config already takes its shape from a tuning; remove privacy.tuning "
                                            "to tune again (and pay again)")
    if p.mechanism != "pmixed":
        raise ConfigError("mechanism", "`pmixed tune` chooses plain PMixED's shape; privacy.mechanism must be \"pmixed\"")
    if method not in ("bind", "trials"):
        raise ConfigError("method", f"must be \"bind\" or \"trials\", got {method!r}")
    other = {"bind": {"--positions-per-unit": per_unit, "--gamma": gamma, "--eta": eta, "--tails": tails,
                      "--lam-max": lam_max},
             "trials": {"--public-blocks": public_blocks}}[method]
    given = [name for name, value in other.items() if value is not None]
    if given:  # an option the chosen method does not read is a mistake, not something to ignore
        raise ConfigError("method", f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not read by "
                                    f"--method {method}")
    public_blocks, per_unit, gamma, eta, tails, lam_max = (
        DEFAULTS[name] if value is None else value
        for name, value in (("--public-blocks", public_blocks), ("--positions-per-unit", per_unit),
                            ("--gamma", gamma), ("--eta", eta), ("--tails", tails), ("--lam-max", lam_max)))
    score_epsilon = SCORE_EPSILON[method] if score_epsilon is None else score_epsilon
    laplace_rdp(2.0, score_epsilon)  # every argument checked before the model loads
    check_ensemble_matches(cfg)
    # the plan before the ledger and the model: it fixes the one order at which every candidate is
    # calibrated and at which the serving ledger's Renyi filter works (section 12)
    if method == "bind":
        params, cands = bind_plan(cfg, public_blocks * (cfg.eval.block_size - 1), score_epsilon)
        order = params.reference.max_order
    else:
        tail_vals, lam_vals = _floats("tails", tails), _floats("lam_max", lam_max)
        check_trials(eta, gamma)
        candidates(cfg, tail_vals, lam_vals)
        units = held_out_units(cfg)
        if units == 0:
            raise DataError("the ensemble has no held-out units to tune on (data.eval_units = 0?)")
        cands, params = plan(cfg, units, per_unit, score_epsilon, eta, gamma, tail_vals, lam_vals)
        order = cands[0].calibration.params.max_order
    out = Path(cfg.output_dir) / "tune"
    out.mkdir(parents=True, exist_ok=True)  # where the result goes exists before anything is paid
    path = None if experiment else (ledger or str(cfg.output_dir / "ledgers" / "serve.ledger"))
    if path is not None and "://" not in path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:  # the ledger before the model: a foreign or corrupt file stops here
        led = Ledger(MEMORY if path is None else path, epsilon=p.epsilon, delta=p.delta, rule=RenyiFilterRule(order))
    except LedgerError as err:
        raise LedgerError(f"{err}; {ledger_hint(_shown(path))}") from err
    with led:
        announce_long_steps(cfg)
        ens, runtime = load_runtime(cfg, progress=not quiet, checked=True)
        if method == "bind":
            L = min(cfg.eval.block_size, runtime.context_length or cfg.eval.block_size)
            # the positions at the model's context: the charge (H4) and the candidates do not
            # depend on them, so the plan's order and calibrations stand
            params = dataclasses.replace(params, positions=public_blocks * (L - 1))
            charge = bind_charge(params, led.orders)
        else:
            blocks = unit_blocks(ens, cfg.eval.block_size, runtime.context_length)  # U, the number of held-out units, is public
            if len(blocks) != params.units:
                raise DataError(f"{len(blocks)} held-out units in the ensemble, {params.units} in its eval_records.jsonl")
            charge = tuning_charge(params, led.orders)
        if not led.can_afford(charge):  # refused before any forward pass, nothing charged
            raise BudgetExhausted(led.epsilon_spent(), led.epsilon_if(charge), p.epsilon,
                                  f"the tuning's charge does not fit; {ledger_hint(_shown(path))}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        chunk = cfg.eval.chunk_for(runtime.device.type)
        if method == "bind":
            texts = public_blocks_of(runtime, public_blocks, L, start_token(ens.tokenizer))  # the public model alone
            res = tune_bind(runtime, texts, params, cands, led, generator=gen)
        else:
            res = tune(runtime, blocks, cands, params, led, generator=gen, chunk=chunk)
    c = res.chosen
    untuned = c.calibration  # trials: the candidate at the common order, before the tuning's charge
    if method == "bind":  # bind's candidates are calibrated after the charge: the same order without it
        from pmixed.privacy.calibration import calibrate

        untuned = calibrate(**cfg.privacy.calibration_kwargs(cfg.data.n_parts, lam_max=c.lam_max, tail=c.tail,
                                                             alpha=c.calibration.params.max_order))
    try:  # what privacy.tuning will serve: the T queries on top of the tuning's curve
        after = serving_calibration(cfg, c, dict(zip(charge.orders, charge.rdp)))
    except ConfigError:
        after = None
    record = {**res.record(), "method": method, "config": cfg.source_path,
              "spent": {"orders": list(charge.orders), "rdp": [r if r != float("inf") else "inf" for r in charge.rdp]},
              "ledger": None if path is None else _shown(path), "experiment": experiment, "seeded": seed is not None,
              "serving_after": None if after is None else {"queries": p.queries, "alpha": after.alpha,
                                                            "scale": scale_of(after.params),
                                                            "radii": list(after.params.radii)},
              "serving_untuned_scale": scale_of(untuned.params)}
    (out / "tune.json").write_text(json.dumps(record, indent=2, default=float))
    con = _console()
    where = "in-memory experiment ledger" if path is None else f"ledger {_shown(path)}"
    if method == "bind":
        con.print(f"chosen shape: tail = {c.tail:g}, lam_max = {c.lam_max:g} (noisy cap share "
                  f"{res.released:.3f} over {params.positions} public positions: lam_max "
                  f"{params.low:g} below {params.lower:.3g}, {params.high:g} from {params.upper:g}, else "
                  f"{params.reference.lam_max:g})", markup=False)
        con.print(f"tuning charged to the {where}: epsilon spent now {res.epsilon_spent:.4f} of {p.epsilon:g} "
                  f"(delta {p.delta:g}); one Laplace release of pure epsilon {score_epsilon:g}, eq. (H4)", markup=False)
    else:
        con.print(f"chosen shape: tail = {c.tail:g}, lam_max = {c.lam_max:g} (noisy hit rate "
                  f"{res.released:.3f} over {len(blocks)} held-out units x {per_unit} positions)", markup=False)
        con.print(f"tuning charged to the {where}: epsilon spent now {res.epsilon_spent:.4f} of {p.epsilon:g} "
                  f"(delta {p.delta:g}); {len(cands)} candidates, E[trials] = {expected_trials(eta, gamma):.1f} "
                  "(the number run is not shown: it is part of what eq. (H3) hides)", markup=False)
    if after is None:
        con.print(f"what is left cannot pay for {p.queries} queries with this shape: lower privacy.queries", markup=False)
    else:
        con.print(f"serving {p.queries} queries after the tuning: radius scale {scale_of(after.params):.4f} at "
                  f"order {after.alpha} (without the tuning's charge: {scale_of(untuned.params):.4f}); "
                  f"to serve it, put in [privacy]: tuning = \"{out / 'tune.json'}\" (and leave lam_max, tail, "
                  "alpha unset)", markup=False)
    con.print(f"wrote: {out / 'tune.json'}", markup=False)


def pay_config_tuning(cfg, ledger, *, experiment: bool = False) -> str | None:
    """Before ``privacy.tuning``'s shape serves anything from ``ledger``: refuse a seeded tuning
    outside an experiment (its choice is not a private release), and charge the tuning to the
    ledger unless it already carries it (``pay_tuning``). Returns a line to show when it was
    charged now, else None."""
    from pmixed.errors import ConfigError
    from pmixed.privacy.tuning import pay_tuning

    if cfg.privacy.tuning is None:
        return None
    rec = cfg.privacy.tuning_record()
    if rec.get("seeded") and not experiment:
        raise ConfigError("privacy.tuning", f"{cfg.privacy.tuning} was chosen with --seed, so it is not a private "
                                            "release; run `pmixed tune` again without --seed")
    if pay_tuning(ledger, rec["tuning"]):
        return None
    return (f"the accounted tuning {cfg.privacy.tuning} was not in this ledger: charged now, before anything is "
            f"served (epsilon spent {ledger.epsilon_spent():.4f})")


def tuned_ledger_rule(cfg) -> dict:
    """The ledger keywords for a config: ``{"rule": RenyiFilterRule(K)}`` when ``privacy.tuning``
    is set (the served shape's per-query cost depends on the tuning's output, so the budget is a
    Renyi filter at the order K that the tuning fixed for every candidate before it ran:
    docs/privacy.md section 12), else ``{}`` (the default rule)."""
    if cfg.privacy.tuning is None:
        return {}
    from pmixed.privacy.acceptance import RenyiFilterRule

    return {"rule": RenyiFilterRule(int(cfg.privacy.tuned()["alpha"]))}
