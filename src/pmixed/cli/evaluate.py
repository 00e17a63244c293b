"""`pmixed eval`, `pmixed sweep`, `pmixed generate` and `pmixed demo`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from pmixed.config import load_run_config

ConfigOpt = typer.Option(..., "--config", "-c", help="Run configuration (TOML).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")


def silence_third_party() -> None:
    """``-q``: no progress bars and none of the third-party noise (transformers' warnings and
    "Loading weights" bars, FutureWarnings, Opacus' and torch's UserWarnings). Our own one-line
    announcements of long steps still print."""
    import logging
    import os
    import warnings

    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(opacus|torch|transformers|peft)(\.|$)")
    for name in ("transformers", "peft", "opacus", "huggingface_hub", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def announce_long_steps(cfg, *, trains: bool = False) -> None:
    """One line, printed even under ``-q``, before a step that takes minutes: building the
    public base ``builtin:tiny-gpt2`` when it is not cached yet, with its expected duration
    (for a command that only loads a trained run: only when there is one to load)."""
    if cfg.model.base != "builtin:tiny-gpt2":
        return
    if not trains and not (cfg.output_dir / "ensemble.json").is_file():
        return
    try:
        from pmixed.models.tiny_gpt2 import is_built, tiny_gpt2_dir

        if is_built(tiny_gpt2_dir(cfg.public_pretrain)):
            return
    except Exception:  # pragma: no cover - the cache layout moved: say nothing rather than fail
        return
    from pmixed.train.public_pretrain import announce_pretrain  # the build then does not repeat it

    announce_pretrain(cfg.public_pretrain)


def _console():
    from rich.console import Console

    return Console()


def _show(con, prompt: str, text: str) -> None:
    """The prompt in bold and the released text, verbatim (no markup read from model output)."""
    from rich.text import Text

    con.print(Text.assemble((prompt, "bold"), text))


MechanismOpt = typer.Option(
    None, "--mechanism", "-m",
    help="pmixed or adaptive (screened PMixED through a Renyi filter, docs/privacy.md section 11); "
         "default: the config's privacy.mechanism.")


def with_mechanism(cfg, mechanism: str | None):
    """``cfg`` with ``privacy.mechanism`` replaced (validated as the config field)."""
    import dataclasses

    if mechanism is None:
        return cfg
    return dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, mechanism=mechanism))


def eval_cmd(
    config: Path = ConfigOpt,
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="Override [run] output_dir."),
    mechanism: str | None = MechanismOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Teacher-forced perplexity: public, fine-tuned, DP-SGD, ensemble average and PMixED."""
    from pmixed.eval.runner import evaluate_config

    if quiet:
        silence_third_party()
    cfg = with_mechanism(load_run_config(config, output_dir), mechanism)
    announce_long_steps(cfg)
    res = evaluate_config(cfg, progress=not quiet)
    con = _console()
    con.print(Path(res["outputs"]["md"]).read_text())
    s = res["pmixed"][0]
    con.print(f"PMixED: {s['runs']} runs x {s['queries']} queries, epsilon spent per run "
              f"{s['epsilon_spent']:.4f} <= {s['epsilon']}", markup=False)
    con.print(nonprivate_line(s), markup=False, highlight=False)
    for a in res["pmixed"][1:]:
        con.print(adaptive_line(a), markup=False, highlight=False)
    con.print(f"wrote ({res['seconds']['total']:.1f}s): " + " ".join(res["outputs"].values()), markup=False)
    for name, why in res["baseline_warnings"].items():
        con.print(f"warning: the {name} baseline does not match this config "
                  f"({'; '.join(why)}): retrain it with `pmixed train {name.replace('_', '-')}`", markup=False)


def nonprivate(s: dict) -> dict:
    from pmixed.eval.report import nonprivate as get

    return get(s)


def nonprivate_line(s: dict) -> str:
    """The lambda statistics of a PMixED summary, labelled for what they are."""
    d = nonprivate(s)
    bind = ", ".join(f"{k} {v}" for k, v in d["binding_constraint"].items())
    return (f"non-private diagnostic (functions of the private members, not covered by epsilon; do not "
            f"publish): mean lambda {d['mean_lambda']:.3f}, empty draws {100 * d['empty_draw_fraction']:.1f}%, "
            f"binding constraint {bind}")


def adaptive_line(s: dict) -> str:
    """A screened-PMixED summary in one line (its counts are functions of released bits)."""
    return (f"adaptive: {s['runs']} runs x {s['queries']} queries under a Renyi filter at order "
            f"{s['filter_order']}, epsilon spent per run {s['epsilon_spent']:.4f} <= {s['epsilon']}; "
            f"{s['units_per_session']:.0f} of {s['private_queries']} private answers used, "
            f"{100 * s['private_fraction']:.1f}% of queries private, the filter stopped private answers after "
            f"{s['queries_before_stop']:.0f} queries on average")


def sweep_cmd(
    config: Path = ConfigOpt,
    param: list[str] = typer.Option(
        ["epsilon", "members", "queries", "alpha", "sample_rate"], "--param", "-p",
        help="Parameter(s) to sweep: epsilon, members, queries, alpha, sample_rate, lam_max, tail; with "
             "--mechanism adaptive also private_queries, screen_threshold.",
    ),
    values: str | None = typer.Option(None, "--values", help="Comma-separated values (one --param only)."),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="Override [run] output_dir."),
    mechanism: str | None = MechanismOpt,
    quiet: bool = QuietOpt,
) -> None:
    """PMixED perplexity over the paper's ablation grids (CSV + PNG line plots)."""
    from pmixed.errors import ConfigError
    from pmixed.eval.runner import sweep_config

    if quiet:
        silence_third_party()
    cfg = with_mechanism(load_run_config(config, output_dir), mechanism)
    announce_long_steps(cfg)
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
        if s.get("mechanism") == "adaptive":
            con.print(f"{s['name']:>22}: PPL {s['ppl_mean']:.2f} ± {s['ppl_std']:.2f}  ({100 * s['private_fraction']:.1f}% "
                      f"private, stopped after {s['queries_before_stop']:.0f} queries)", markup=False)
            continue
        con.print(f"{s['name']:>22}: PPL {s['ppl_mean']:.2f} ± {s['ppl_std']:.2f}  (non-private diagnostic: "
                  f"mean lambda {nonprivate(s)['mean_lambda']:.3f})", markup=False)
    con.print("wrote: " + " ".join(res["outputs"].values()), markup=False)


def generate_cmd(
    config: Path = ConfigOpt,
    prompt: str = typer.Option("The President", "--prompt", help="The text to continue."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    temperature: float = typer.Option(1.0, "--temperature", min=1e-3,
                                      help="Sampling temperature: only 1 is covered by the privacy guarantee; another needs --experiment --seed."),
    ledger: Path | None = typer.Option(None, "--ledger", help="Ledger file (default: <output_dir>/ledgers/generate.ledger)."),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed the draws and the sampling: only with --experiment (the output is not a private release)."),
    experiment: bool = typer.Option(
        False, "--experiment",
        help="An experiment: charge a fresh in-memory ledger (nothing durable); required by --seed, refuses --ledger."),
    truncate_prompt: bool = typer.Option(
        False, "--truncate-prompt", help="Cut a prompt longer than the model's context from the left (default: refuse)."),
    ignore_eos: bool = typer.Option(
        False, "--ignore-eos", help="Keep generating past an end-of-text token (each token is charged either way)."),
    mechanism: str | None = typer.Option(
        None, "--mechanism",
        help="pmixed: every token one PMixED query; adaptive: screened PMixED under a Renyi filter (a unit = "
             "one screen round and its one private answer, charged before the round; tokens the screen answers "
             "from the public model cost nothing more; the ledger must use the filter). Default: [privacy] mechanism."),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o"),
    quiet: bool = QuietOpt,
) -> None:
    """Generate privately: every token is one PMixED query, charged to the durable ledger first
    (--mechanism adaptive: one unit per screen round, charged before the round opens)."""
    from pmixed.errors import BudgetExhausted, GenerationInterrupted

    if quiet:
        silence_third_party()
    cfg = load_run_config(config, output_dir)
    check_seed(seed, experiment, ledger)
    check_mechanism(mechanism)
    if temperature != 1.0 and seed is None:  # before the model loads: serving mode takes the release as it is
        from pmixed.errors import ConfigError

        raise ConfigError("--temperature", f"{temperature:g} is not covered by the privacy guarantee (it would act "
                                           "on each draw's mixture, docs/privacy.md section 1); use 1, or "
                                           "--experiment --seed for a non-private experiment")
    announce_long_steps(cfg)
    con = _console()
    try:
        res = generate(cfg, prompt, max_new_tokens, temperature, ledger, seed, experiment=experiment,
                       truncate_prompt=truncate_prompt, progress=not quiet, mechanism=mechanism,
                       ignore_eos=ignore_eos)
    except GenerationInterrupted as err:  # print what was released (and charged), then the error
        _show(con, err.partial.prompt, err.partial.text)
        con.print(f"({len(err.partial.token_ids)} tokens released before the error)", markup=False)
        raise
    if not res.token_ids and res.stopped == "budget":
        typer.echo(f"error: privacy budget exhausted: {budget_line(res)}; nothing was released. "
                   f"{res.ledger_hint}", err=True)
        raise typer.Exit(BudgetExhausted.exit_code)
    _show(con, res.prompt, res.text)
    con.print(f"({len(res.token_ids)} tokens, stopped: {res.stopped}; {budget_line(res)})", markup=False)
    if res.stopped == "budget":
        con.print(f"the budget is spent: {res.ledger_hint}", markup=False)


def check_seed(seed, experiment: bool, ledger_path) -> None:
    """A seed makes the draws and the sampling predictable: the output is not a private release,
    so it is never charged to a durable ledger (issue 11, defect 4)."""
    from pmixed.errors import ConfigError

    if experiment and ledger_path is not None:
        raise ConfigError("experiment", "an experiment charges a fresh in-memory ledger; drop --ledger")
    if seed is not None and not experiment:
        raise ConfigError("seed", "a seeded generation is not a private release and is never charged to a "
                                  "durable ledger; add --experiment (fresh in-memory ledger) or drop --seed")


def check_mechanism(mechanism: str | None) -> str | None:
    """``--mechanism``: None (the config's ``privacy.mechanism``), "pmixed" or "adaptive"."""
    from pmixed.config import MECHANISMS
    from pmixed.errors import ConfigError

    if mechanism is not None and mechanism not in MECHANISMS:
        raise ConfigError("mechanism", f"must be one of {', '.join(MECHANISMS)}, got {mechanism!r}")
    return mechanism


def budget_line(res) -> str:
    where = "in-memory experiment ledger" if res.ledger_path is None else f"ledger {res.ledger_path}"
    if getattr(res, "mechanism", "pmixed") == "adaptive":
        return (f"{where} (Renyi filter, order {res.filter_order}): epsilon spent {res.epsilon_spent:.4f} of "
                f"{res.epsilon_limit:g}; {res.charged} units charged by this generation "
                f"({res.private_answers} private answers, {len(res.token_ids) - res.private_answers} "
                f"screened public answers); {res.queries_left} units left at this config's cost "
                f"(a unit: one screen round and its one private answer)")
    return (f"{where}: epsilon spent {res.epsilon_spent:.4f} of {res.epsilon_limit:g}, "
            f"{res.queries_left} tokens left at this config's cost")


def generate(cfg, prompt, max_new_tokens, temperature=1.0, ledger_path=None, seed=None, runtime=None, *,
             experiment=False, truncate_prompt=False, progress=False, mechanism=None, ignore_eos=False):
    """One private generation with ``cfg``'s mechanism (``PMixED.from_config``, or with
    ``mechanism="adaptive"`` / ``privacy.mechanism = "adaptive"`` ``AdaptivePMixED.from_config``,
    whose ledger is opened under its Renyi filter: a ledger file written under another rule is
    refused before any model is loaded). Returns the engine's Generation with ``epsilon_limit``,
    ``queries_left`` (adaptive: units), ``ledger_path`` (None for an experiment's in-memory ledger)
    and ``ledger_hint`` (how to start a new budget) set."""
    import torch

    from pmixed.cli.privacy import ledger_hint, queries_left
    from pmixed.engine import PrivatePredictor
    from pmixed.errors import BudgetExhausted, LedgerError
    from pmixed.eval.runner import load_runtime
    from pmixed.mechanism.adaptive import AdaptivePMixED
    from pmixed.mechanism.pmixed import PMixED
    from pmixed.privacy.ledger import MEMORY, Ledger

    check_seed(seed, experiment, ledger_path)
    p = cfg.privacy
    kind = check_mechanism(mechanism) or p.mechanism
    adaptive = None
    if kind == "adaptive":  # calibrated before the ledger opens: the ledger needs its filter
        n = runtime.n_members if runtime is not None else cfg.data.n_parts
        adaptive = AdaptivePMixED.from_config(p, n)
    if experiment:
        path = None
    else:
        path = Path(ledger_path or cfg.output_dir / "ledgers" / "generate.ledger")
        path.parent.mkdir(parents=True, exist_ok=True)
    from pmixed.cli.tune import pay_config_tuning, tuned_ledger_rule

    rule = tuned_ledger_rule(cfg) if adaptive is None else {"rule": adaptive.rule}
    try:  # the ledger first: a file of another budget (or rule) is refused before any model is loaded
        led = Ledger(MEMORY if path is None else path, epsilon=p.epsilon, delta=p.delta, **rule)
    except LedgerError as err:
        raise LedgerError(f"{err}; {ledger_hint(path)}") from err
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    kw = {"truncate_prompt": True} if truncate_prompt else {}
    if ignore_eos:
        kw["stop_at_eos"] = False
    with led:
        paid_now = pay_config_tuning(cfg, led, experiment=experiment)  # privacy.tuning: paid before any token
        if paid_now:
            typer.echo(paid_now, err=True)
        if runtime is None:
            _, runtime = load_runtime(cfg, progress=progress)
        mech = adaptive if adaptive is not None else PMixED.from_config(p, runtime.n_members)
        try:
            res = PrivatePredictor(runtime, mech, led, generator=gen).generate(
                prompt, max_new_tokens=max_new_tokens, temperature=temperature, **kw)
        except BudgetExhausted:  # refused before the first token: nothing released
            from pmixed.engine import Generation, ScreenedGeneration

            extra = {} if adaptive is None else {"filter_order": adaptive.order}
            res = (Generation if adaptive is None else ScreenedGeneration)(
                prompt=prompt, text="", token_ids=[], epsilon_spent=led.epsilon_spent(), stopped="budget", **extra)
        limit = led.epsilon  # the engine's Generation carries the same figures; the ledger is the authority
        per_query = mech.charge(led.orders).rdp if adaptive is not None else mech.query_rdp(led.orders)
        left = queries_left(led, per_query)
    hint = "an experiment's ledger lives only for this command" if path is None else ledger_hint(path)
    return Released(res, limit, left, path, hint)


@dataclass(frozen=True)
class Released:
    """The engine's Generation (its fields read through) and the budget it left."""

    generation: Any
    epsilon_limit: float
    queries_left: int
    ledger_path: Path | None  # None: an experiment's in-memory ledger
    ledger_hint: str  # how a CLI user starts a new budget

    def __getattr__(self, name: str) -> Any:
        return getattr(self.generation, name)


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

    if quiet:
        silence_third_party()
    con = _console()
    t0 = time.perf_counter()
    cfg = load_run_config(config)
    announce_long_steps(cfg, trains=True)
    needed = {"builtin:sotu": "sotu", "builtin:spam-ham": "spam-assassin", "builtin:brown": "brown",
              "builtin:moby-dick": "moby-dick"}
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
    g = step("generate", lambda: generate(cfg, prompt, 40, 1.0, cfg.output_dir / "ledgers" / "demo-generate.ledger",
                                          None, runtime))
    each = ("each round of the screen one unit" if getattr(g, "mechanism", "pmixed") == "adaptive"
            else "each token one PMixED query")
    con.print(f"[bold]private continuation[/bold] ({each}; {budget_line(g)}):", highlight=False)
    _show(con, g.prompt, g.text)
    if g.stopped == "budget":
        con.print(f"the demo's generation budget is spent: {g.ledger_hint}", markup=False)
    total = time.perf_counter() - t0
    (cfg.output_dir / "demo-times.json").write_text(json.dumps({"steps": steps, "total": total}, indent=2))
    con.print("times: " + ", ".join(f"{k} {v:.0f}s" for k, v in steps.items()) + f"; total {total:.0f}s")
