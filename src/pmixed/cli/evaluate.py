"""`pmixed eval`, `pmixed sweep`, `pmixed generate` and `pmixed demo`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from pmixed.config import load_run_config

ConfigOpt = typer.Option(..., "--config", "-c", help="Run configuration (TOML).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")


def _console():
    from rich.console import Console

    return Console()


def eval_cmd(
    config: Path = ConfigOpt,
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="Override [run] output_dir."),
    quiet: bool = QuietOpt,
) -> None:
    """Teacher-forced perplexity: public, fine-tuned, DP-SGD, ensemble average and PMixED."""
    from pmixed.eval.runner import evaluate_config

    cfg = load_run_config(config, output_dir)
    res = evaluate_config(cfg, progress=not quiet)
    con = _console()
    con.print(Path(res["outputs"]["md"]).read_text())
    s = res["pmixed"][0]
    con.print(f"PMixED: {s['runs']} runs x {s['queries']} queries, epsilon spent per run "
              f"{s['epsilon_spent']:.4f} <= {s['epsilon']}, mean lambda {s['mean_lambda']:.3f}, "
              f"empty draws {100 * s['empty_draw_fraction']:.1f}%, binding {s['binding_constraint']}")
    con.print(f"outputs: {res['outputs']['md']} {res['outputs']['png']} ({res['seconds']['total']:.1f}s)")
    for name, why in res["baseline_warnings"].items():
        con.print(f"warning: the {name} baseline does not match this config "
                  f"({'; '.join(why)}): retrain it with `pmixed train {name.replace('_', '-')}`", markup=False)


def sweep_cmd(
    config: Path = ConfigOpt,
    param: list[str] = typer.Option(
        ["epsilon", "members", "queries", "alpha", "sample_rate"], "--param", "-p",
        help="Parameter(s) to sweep: epsilon, members, queries, alpha, sample_rate, lam_max, tail.",
    ),
    values: str | None = typer.Option(None, "--values", help="Comma-separated values (one --param only)."),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="Override [run] output_dir."),
    quiet: bool = QuietOpt,
) -> None:
    """PMixED perplexity over the paper's ablation grids (CSV + PNG line plots)."""
    from pmixed.errors import ConfigError
    from pmixed.eval.runner import sweep_config

    cfg = load_run_config(config, output_dir)
    vals = None
    if values is not None:
        if len(param) != 1:
            raise ConfigError("values", "give exactly one --param with --values")
        try:
            vals = {param[0]: [float(v) for v in values.split(",") if v.strip()]}
        except ValueError as err:
            raise ConfigError("values", f"must be comma-separated numbers: {err}") from None
    res = sweep_config(cfg, list(param), values=vals, progress=not quiet)
    con = _console()
    for s in res["pmixed"]:
        con.print(f"{s['name']:>22}: PPL {s['ppl_mean']:.2f} ± {s['ppl_std']:.2f}  (mean lambda {s['mean_lambda']:.3f})")
    con.print(f"outputs: {res['outputs']['csv']} and PNGs in {Path(res['outputs']['csv']).parent}")


def generate_cmd(
    config: Path = ConfigOpt,
    prompt: str = typer.Option("The President", "--prompt", help="The text to continue."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    temperature: float = typer.Option(1.0, "--temperature", min=1e-3),
    ledger: Path | None = typer.Option(None, "--ledger", help="Ledger file (default: <output_dir>/ledgers/generate.ledger)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed (experiments only; default: CSPRNG)."),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o"),
) -> None:
    """Generate privately: every token is one PMixED query, charged to the durable ledger first."""
    res = generate(load_run_config(config, output_dir), prompt, max_new_tokens, temperature, ledger, seed)
    con = _console()
    con.print(f"[bold]{res.prompt}[/bold]{res.text}")
    con.print(f"({len(res.token_ids)} tokens, stopped: {res.stopped}; ledger epsilon spent {res.epsilon_spent:.4f})")


def generate(cfg, prompt, max_new_tokens, temperature=1.0, ledger_path=None, seed=None, runtime=None):
    import torch

    from pmixed.engine import PrivatePredictor
    from pmixed.eval.runner import load_runtime
    from pmixed.mechanism.pmixed import PMixED
    from pmixed.privacy.ledger import Ledger

    if runtime is None:
        _, runtime = load_runtime(cfg, progress=False)
    p = cfg.privacy
    mech = PMixED(epsilon=p.epsilon, delta=p.delta, query_budget=p.queries, ensemble_size=runtime.n_members,
                  sample_rate=p.sample_rate, alpha=p.alpha,
                  **({"lam_max": p.lam_max} if p.lam_max is not None else {}),
                  **({"tail": p.tail} if p.tail is not None else {}))
    path = ledger_path or cfg.output_dir / "ledgers" / "generate.ledger"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with Ledger(path, epsilon=p.epsilon, delta=p.delta) as led:
        return PrivatePredictor(runtime, mech, led, generator=gen).generate(
            prompt, max_new_tokens=max_new_tokens, temperature=temperature)


def demo_cmd(
    config: Path = typer.Option(Path("configs/quick.toml"), "--config", "-c"),
    prompt: str = typer.Option("The state of the Union", "--prompt"),
    quiet: bool = QuietOpt,
) -> None:
    """The whole pipeline on one config: assets, ensemble, both baselines, evaluation, plot, and a
    privately generated continuation. Finished steps are reused on a second run."""
    from pmixed.assets import fetch_assets
    from pmixed.eval.runner import evaluate_config, load_runtime
    from pmixed.models.records import baseline_mismatch
    from pmixed.train.dpsgd import train_dpsgd
    from pmixed.train.dpsgd_unit import train_dpsgd_unit
    from pmixed.train.ensemble import train_ensemble
    from pmixed.train.finetune import train_finetune

    con = _console()
    t0 = time.perf_counter()
    cfg = load_run_config(config)
    needed = {"builtin:sotu": "sotu", "builtin:spam-ham": "spam-assassin", "builtin:brown": "brown"}
    names = sorted({needed[s] for s in (cfg.data.source, cfg.public_pretrain.corpus) if s in needed}
                   | ({"smollm2-135m"} if cfg.model.base == "builtin:smollm2-135m" else set()))
    steps = {}

    def step(name, fn):
        s = time.perf_counter()
        con.rule(f"[bold]{name}")
        out = fn()
        steps[name] = time.perf_counter() - s
        return out

    step("assets", lambda: fetch_assets(names))
    step("ensemble", lambda: train_ensemble(cfg, progress=not quiet))
    baselines = [("finetune", train_finetune), ("dpsgd", train_dpsgd)]
    if cfg.dpsgd_unit.enabled:
        baselines.append(("dpsgd_unit", train_dpsgd_unit))
    for name, fn in baselines:
        stale = baseline_mismatch(cfg, name)
        if not stale:
            con.print(f"{name}: reusing {cfg.output_dir / name}")
            steps[name] = 0.0
        else:
            if stale != ["not trained yet"]:
                con.print(f"{name}: retraining ({'; '.join(stale)})", markup=False)
            step(name, lambda fn=fn: fn(cfg, progress=not quiet))
    res = step("evaluate", lambda: evaluate_config(cfg, progress=not quiet))
    con.print(Path(res["outputs"]["md"]).read_text())
    con.print(f"plot: {res['outputs']['png']}")
    _, runtime = load_runtime(cfg, progress=False)
    g = step("generate", lambda: generate(cfg, prompt, 40, 0.7, cfg.output_dir / "ledgers" / "demo-generate.ledger",
                                          None, runtime))
    con.print(f"[bold]private continuation[/bold] (each token one PMixED query, epsilon spent "
              f"{g.epsilon_spent:.3f}):\n[bold]{g.prompt}[/bold]{g.text}")
    total = time.perf_counter() - t0
    (cfg.output_dir / "demo-times.json").write_text(json.dumps({"steps": steps, "total": total}, indent=2))
    con.print("times: " + ", ".join(f"{k} {v:.0f}s" for k, v in steps.items()) + f"; total {total:.0f}s")
