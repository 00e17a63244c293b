"""``pmixed serve`` (the OpenAI-compatible server) and ``pmixed keys`` (its API keys).

Start-up stops with one line (and the error's exit code) when anything is wrong before the first
request: a config whose ensemble size differs from the trained ensemble (6), a corrupt or foreign
ledger (4), a missing key file or one without a live key (2).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

KeysOpt = typer.Option(None, "--keys", "-k", help="Key file (default: <output_dir>/keys.db of --config).")
KeysConfigOpt = typer.Option(None, "--config", "-c", help="Run configuration: its <output_dir>/keys.db.")


def _keys_path(keys: Path | None, config: Path | None) -> Path:
    from pmixed.errors import ConfigError

    if keys is not None:
        return keys
    if config is None:
        raise ConfigError("keys", "give the key file (--keys FILE) or the run's config (--config FILE)")
    from pmixed.config import load_config

    return load_config(config).output_dir / "keys.db"


def _store(keys: Path | None, config: Path | None, *, create: bool):
    from pmixed.serve.keys import KeyStore

    return KeyStore(_keys_path(keys, config), create=create)


@app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="Who the key is for (shown in listings and logs)."),
    admin: bool = typer.Option(False, "--admin", help="May read /metrics, list keys and reset quotas."),
    quota: int = typer.Option(10_000, "--quota", min=0,
                              help="Private tokens per window (0: no quota; a shared budget wants one)."),
    period: int = typer.Option(86_400, "--period", min=1, help="Quota window, seconds."),
    keys: Path | None = KeysOpt,
    config: Path | None = KeysConfigOpt,
) -> None:
    """Create an API key. The key is printed once; the file keeps only its hash."""
    store = _store(keys, config, create=True)
    info, secret = store.create(name, admin=admin, quota=quota or None, period=period)
    typer.echo(secret)
    quota_s = "no quota" if info.quota is None else f"quota {info.quota} tokens per {info.period} s"
    typer.echo(f"key {info.id} ({info.name}{', admin' if info.admin else ''}; {quota_s}) in {store.path}; "
               "the key is shown only now", err=True)


@app.command("list")
def keys_list(keys: Path | None = KeysOpt, config: Path | None = KeysConfigOpt) -> None:
    """List the keys (never the secrets): id, name, admin, quota, used in this window, revoked."""
    store = _store(keys, config, create=False)
    rows = store.list()
    if not rows:
        typer.echo(f"no keys in {store.path}")
        return
    typer.echo(f"{'id':8}  {'name':20}  {'admin':5}  {'quota':>10}  {'used':>8}  {'period_s':>8}  status")
    for k in rows:
        quota = "-" if k.quota is None else str(k.quota)
        typer.echo(f"{k.id:8}  {k.name[:20]:20}  {'yes' if k.admin else 'no':5}  {quota:>10}  {k.used:>8}  "
                   f"{k.period:>8}  {'revoked' if k.revoked else 'active'}")


@app.command("revoke")
def keys_revoke(key: str = typer.Argument(..., help="The key's id or name."),
                keys: Path | None = KeysOpt, config: Path | None = KeysConfigOpt) -> None:
    """Revoke a key: the server refuses it from its next request on."""
    info = _store(keys, config, create=False).revoke(key)
    typer.echo(f"key {info.id} ({info.name}) revoked")


@app.command("reset")
def keys_reset(key: str = typer.Argument(..., help="The key's id or name."),
               keys: Path | None = KeysOpt, config: Path | None = KeysConfigOpt) -> None:
    """Start a new quota window for a key now."""
    info = _store(keys, config, create=False).reset(key)
    typer.echo(f"key {info.id} ({info.name}): quota window reset")


def serve_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="Run configuration (TOML) of a trained ensemble."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    ledger: str | None = typer.Option(
        None, "--ledger", help="Ledger (default: <output_dir>/ledgers/serve.ledger); every process "
                               "serving this deployment must share it."),
    mode: str = typer.Option("constant", "--mode",
                             help="constant: a step's work does not depend on the draw (default); drawn: "
                                  "only the drawn members run (less work at small q; per-token timing depends on the draw)."),
    mechanism: str | None = typer.Option(
        None, "--mechanism",
        help="pmixed: every token one PMixED query; adaptive: screened PMixED under a Renyi filter (a unit = one "
             "screen round and its one private answer, taken before the round opens; tokens the screen answers from "
             "the public model cost nothing more; the ledger must use the filter). Default: [privacy] mechanism."),
    dtype: str | None = typer.Option(
        None, "--dtype",
        help="Precision of the forwards: model, float32, bfloat16 or float16 (default: [eval] dtype). bfloat16 "
             "serves about 2x faster under load on CPUs with AMX (README, Serving speed); the mechanism runs in float64 "
             "either way, so the guarantee is the same."),
    max_active: int = typer.Option(8, "--max-active", min=1, help="Requests decoded at once."),
    max_queue: int = typer.Option(32, "--max-queue", min=0, help="Requests waiting beyond --max-active (then 429)."),
    prefill_tokens: int = typer.Option(
        64, "--prefill-tokens", min=0,
        help="Chunked prefill: at most this many prompt tokens consumed per step, so that a long prompt "
             "does not stall the streams already decoding (0: each prompt whole, in the step it arrives)."),
    public_continuation: bool = typer.Option(
        False, "--public-continuation",
        help="When the budget runs out, continue from the public model alone, each such token marked."),
    keys: Path | None = typer.Option(None, "--keys", "-k", help="Key file (default: <output_dir>/keys.db)."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Cap on a request's max_tokens."),
    max_n: int = typer.Option(4, "--max-n", min=1, help="Cap on a request's choices (n x prompts)."),
    model_name: str | None = typer.Option(None, "--model-name", help="The model id clients send (default: "
                                                                     "the output directory's name)."),
    log_text: bool = typer.Option(False, "--log-text", help="Log prompts and completions (off: never logged)."),
    output_dir: Path | None = typer.Option(None, "--output-dir", "-o", help="Override [run] output_dir."),
) -> None:
    """Serve the ensemble over an OpenAI-compatible HTTP API; every token is charged first
    (--mechanism adaptive: every token is covered by a unit charged before its screen round)."""
    import dataclasses

    from pmixed.config import DTYPES, MECHANISMS, load_run_config
    from pmixed.errors import ConfigError, LedgerError
    from pmixed.serve.keys import KeyStore

    if mode not in ("constant", "drawn"):
        raise ConfigError("mode", f"must be 'constant' or 'drawn', got {mode!r}")
    if prefill_tokens == 1:  # a one-token piece would make constant mode's batch rebuild (scheduler)
        raise ConfigError("prefill_tokens", "must be 0 (each prompt whole) or at least 2")
    if mechanism is not None and mechanism not in MECHANISMS:
        raise ConfigError("mechanism", f"must be one of {', '.join(MECHANISMS)}, got {mechanism!r}")
    if dtype is not None and dtype not in ("model", *DTYPES):
        raise ConfigError("dtype", f"must be one of model, {', '.join(DTYPES)}; got {dtype!r}")
    cfg = load_run_config(config, output_dir)
    if dtype is not None:  # as [eval] dtype: load_runtime casts the base after its hash is checked
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, dtype=dtype))
    kind = mechanism or cfg.privacy.mechanism
    keys_path = keys or cfg.output_dir / "keys.db"
    store = KeyStore(keys_path, create=False)
    if store.active_count() == 0:
        raise ConfigError("keys", f"{keys_path} has no active key: `pmixed keys create NAME --keys {keys_path}`")

    import uvicorn

    from pmixed.cli.privacy import ledger_hint
    from pmixed.eval.runner import check_ensemble_matches, load_runtime
    from pmixed.mechanism.adaptive import AdaptivePMixED
    from pmixed.mechanism.pmixed import PMixED
    from pmixed.privacy.ledger import Ledger
    from pmixed.serve.app import create_app
    from pmixed.serve.protocol import Limits
    from pmixed.serve.scheduler import Decoder

    matched = (cfg.output_dir / "ensemble.json").is_file()  # else load_runtime says there is none
    if matched:
        check_ensemble_matches(cfg)  # EnsembleMismatch (N, base, data differ) before anything opens
    where = ledger or str(cfg.output_dir / "ledgers" / "serve.ledger")
    if "://" not in where:
        Path(where).parent.mkdir(parents=True, exist_ok=True)
    # screened PMixED is calibrated before the ledger opens (the ledger needs its Renyi filter);
    # N is the config's, which check_ensemble_matches held against the trained ensemble
    adaptive = AdaptivePMixED.from_config(cfg.privacy, cfg.data.n_parts) if kind == "adaptive" else None
    from pmixed.cli.tune import pay_config_tuning, tuned_ledger_rule

    rule = tuned_ledger_rule(cfg) if adaptive is None else {"rule": adaptive.rule}
    try:  # the ledger before the model: a corrupt or foreign one (or another rule's) stops start-up at once
        led = Ledger(where, epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta, **rule)
    except LedgerError as err:
        raise LedgerError(f"{err}; {ledger_hint(_shown(where))}") from err
    try:
        paid_now = pay_config_tuning(cfg, led)  # privacy.tuning: the serving ledger pays it before any token
        if paid_now:
            typer.echo(paid_now, err=True)
        _, runtime = load_runtime(cfg, progress=False, checked=matched)
        mech = adaptive if adaptive is not None else PMixED.from_config(cfg.privacy, runtime.n_members)
        decoder = Decoder(runtime, mech, led, mode=mode, max_active=max_active, max_queue=max_queue,
                          public_continuation=public_continuation, unit=cfg.data.unit or "part",
                          prefill_tokens=prefill_tokens or None)
        decoder.warm_up()  # kernels loaded now, not in the first request's first token
    except BaseException:
        led.close()
        raise
    name = model_name or cfg.output_dir.resolve().name
    limits = Limits(max_tokens=max_tokens, n=max_n)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    plog = logging.getLogger("pmixed.serve")
    plog.addHandler(handler)
    plog.setLevel(logging.INFO)
    plog.propagate = False
    p = decoder.privacy()
    if adaptive is None:
        what, left = "", f"{p['queries_left']} tokens left"
    else:
        what = f"; mechanism adaptive, Renyi filter order {p['filter_order']}"
        left = f"{p['queries_left']} units left (a unit: one screen round and its one private answer)"
    typer.echo(f"serving {name!r} on http://{host}:{port} (mode {mode}{what}; forwards in "
               f"{str(runtime.dtype).removeprefix('torch.')}; ledger {_shown(where)}: epsilon spent "
               f"{p['epsilon_spent']:.4f} of {p['epsilon_limit']:g}, {left}; "
               f"keys {keys_path})", err=True)
    import signal

    def _stop(signum, frame):  # uvicorn shuts down gracefully, then re-raises the signal here
        raise _Stopped(signum)

    previous = signal.signal(signal.SIGTERM, _stop)
    decoder.start()
    try:
        server_app = create_app(decoder, keys=store, model_name=name, limits=limits, log_text=log_text)
        uvicorn.run(server_app, host=host, port=port, log_level="info", access_log=False)
    except (_Stopped, KeyboardInterrupt):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        decoder.close()  # running streams end "cancelled"; every token sent was charged first
        led.close()
        store.close()
    typer.echo("stopped", err=True)


def _shown(where: str) -> str:
    """A ledger location fit to print: a URL's password masked."""
    import re

    return re.sub(r"(://[^/:@]*):[^@/]*@", r"\1:***@", where)


class _Stopped(Exception):
    """SIGTERM: a clean stop (exit 0) after uvicorn's graceful shutdown."""
