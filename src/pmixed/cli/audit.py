"""`pmixed audit`: an empirical lower bound on the epsilon of a trained ensemble's releases, to set
against the claimed epsilon (docs/privacy.md section 13; eqs. (A1)-(A3))."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pmixed.cli.evaluate import (
    ConfigOpt,
    QuietOpt,
    _console,
    announce_long_steps,
    silence_third_party,
)
from pmixed.config import load_run_config


def audit_cmd(
    config: Path = ConfigOpt,
    sessions: int = typer.Option(
        20000, "--sessions", min=4, help="Sessions of the game per world (D and D'); more raise the largest bound a run "
                                         "can show (7.7 at 20000)."),
    queries: int = typer.Option(
        64, "--queries", min=1, help="Queries per session (public positions); the claim is the accountant's epsilon "
                                     "for this many queries."),
    member: int = typer.Option(0, "--member", min=0, help="The member whose part the canary replaces."),
    confidence: float = typer.Option(0.95, "--confidence", help="Confidence of the lower bound."),
    control: bool = typer.Option(
        True, "--control/--no-control", help="Also run the game on a deliberately unsound control (the same "
                                             "mechanism without its ball) to show what the audit can catch."),
    seed: int = typer.Option(0, "--seed", help="Seed of the game's draws (an audit is an experiment, not a release)."),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="Override [run] output_dir."),
    quiet: bool = QuietOpt,
) -> None:
    """Audit the trained ensemble's PMixED releases: one part replaced by a canary member, sessions
    of --queries real releases at public positions, a likelihood-ratio test on whether each
    sampled token is the canary's; prints the epsilon lower bound at --confidence against the
    claimed epsilon for those queries. Charges no ledger: nothing is released to anyone."""
    import torch

    from pmixed.errors import ConfigError
    from pmixed.eval.audit import audit, ensemble_positions, position_rates, unsound_control
    from pmixed.eval.runner import check_ensemble_matches, load_runtime
    from pmixed.eval.tuning import start_token
    from pmixed.mechanism.pmixed import PMixED

    if quiet:
        silence_third_party()
    cfg = load_run_config(config, output_dir)
    p = cfg.privacy
    if p.mechanism != "pmixed":
        raise ConfigError("mechanism", "`pmixed audit` audits plain PMixED's releases; privacy.mechanism must be "
                                       "\"pmixed\"")
    if not 0.0 < confidence < 1.0:
        raise ConfigError("confidence", f"must lie in (0, 1), got {confidence!r}")
    N = cfg.data.n_parts
    if member >= N:
        raise ConfigError("member", f"must lie in [0, {N}), got {member}")
    mech = PMixED(**cfg.privacy.calibration_kwargs(N))  # the served calibration, before any model loads
    check_ensemble_matches(cfg)
    announce_long_steps(cfg)
    ens, runtime = load_runtime(cfg, progress=not quiet, checked=True)
    L = min(65, runtime.context_length or 65)
    gen = torch.Generator().manual_seed(seed)
    public, members = ensemble_positions(runtime, queries, L, start_token(ens.tokenizer),
                                         cfg.eval.chunk_for(runtime.device.type))
    claim = mech.epsilon_after(queries)
    runs = {"mechanism": mech.params, **({"control": unsound_control(mech.params)} if control else {})}
    results = {}
    for name, params in runs.items():
        rates = position_rates(public, members, params, member, generator=gen)
        results[name] = audit(rates, params, delta=p.delta, epsilon_claimed=claim, sessions=sessions,
                              confidence=confidence, generator=gen)
    res = results["mechanism"]
    out = Path(cfg.output_dir) / "audit"
    out.mkdir(parents=True, exist_ok=True)
    record = {**res.record(), "config": cfg.source_path, "seed": seed, "ensemble_size": N,
              "sample_rate": p.sample_rate, "alpha": mech.alpha, "lam_max": mech.params.lam_max,
              "calibrated_for": {"epsilon": p.epsilon, "delta": p.delta, "queries": p.queries},
              "control": results["control"].record() if control else None}
    (out / "audit.json").write_text(json.dumps(record, indent=2))
    con = _console()
    for name, r in results.items():
        c = r.counts[r.direction]
        label = ("the mechanism" if name == "mechanism"
                 else "control (deliberately unsound: the same mechanism without its ball)")
        if name == "mechanism":
            verdict = ("VIOLATED: the bound exceeds the claim" if r.violated
                       else "consistent with the claim (a lower bound: it cannot show the claim tight)")
        else:
            verdict = ("caught: the audit detects an unsound mechanism here" if r.violated
                       else "not caught: it reached the most these sessions can show (raise --sessions, or "
                            "lower --queries, whose claim is smaller)" if r.epsilon_lower >= r.ceiling - 1e-9
                       else "not caught: on these positions the audit is too weak to detect even this")
        con.print(f"{label}: {sessions} sessions per world x {queries} queries at public positions, member "
                  f"{member} replaced by a canary; test {r.direction}: {c['tp']}/{c['n1']} hits against "
                  f"{c['fp']}/{c['n0']} false alarms; epsilon lower bound {r.epsilon_lower:.3f} at confidence "
                  f"{confidence:g} against the claimed {claim:.3f} for {queries} queries at delta {p.delta:g}: "
                  f"{verdict}", markup=False)
    con.print(f"the most {sessions} sessions per world can show is epsilon {res.ceiling:.3f} (every hit, no false "
              "alarm): more --sessions raise it", markup=False)
    con.print(f"wrote: {out / 'audit.json'}", markup=False)
    if res.violated:
        raise typer.Exit(1)
