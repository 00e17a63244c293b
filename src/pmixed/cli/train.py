"""`pmixed train ...` commands: the ensemble (Phase I) and the baselines.

Heavy imports (torch, transformers, peft, opacus) happen inside the commands.
Distributed ensemble training: ``torchrun --nproc_per_node=K -m pmixed.train.ensemble_main
--config FILE`` (each rank trains members i with i % K == rank).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import typer

from pmixed.config import load_run_config

app = typer.Typer(no_args_is_help=True)

ConfigOpt = typer.Option(..., "--config", "-c", help="Run configuration (TOML).", exists=False)
OutOpt = typer.Option(None, "--output-dir", "-o", help="Override [run] output_dir.")
QuietOpt = typer.Option(
    False, "--quiet", "-q",
    help="No progress bars and no third-party warnings; a long step (building the public base) is still announced.",
)


def _start(config: Path, output_dir: Path | None, quiet: bool):
    """The config, after ``-q`` silenced third-party noise (before anything heavy is imported). A
    build of ``builtin:tiny-gpt2`` is announced by the build itself (:mod:`pmixed.train.public_pretrain`),
    after the data are checked, ``-q`` or not."""
    if quiet:
        from pmixed.cli.evaluate import silence_third_party

        silence_third_party()
        # Opacus' per-sample hooks on a LoRA model (no input requires a gradient): benign, and
        # attributed to our module, not torch's
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    return load_run_config(config, output_dir)


def _say(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(msg)


@app.command("ensemble")
def ensemble(config: Path = ConfigOpt, output_dir: Path = OutOpt, quiet: bool = QuietOpt) -> None:
    """Fine-tune one LoRA adapter per part of the private data (resumable)."""
    from pmixed.train.ensemble import short_line, train_ensemble

    cfg = _start(config, output_dir, quiet)
    res = train_ensemble(cfg, progress=not quiet)
    if res.manifest is not None:
        members = res.manifest["members"]
        losses = [m["final_train_loss"] for m in members]
        short = [line for m in members if (line := short_line(m)) is not None]
        _say(
            f"[bold]ensemble[/bold] {res.manifest['n_members']} members in {res.output_dir} "
            f"(trained {len(res.trained)}, skipped {len(res.skipped)}, {res.seconds:.1f}s); "
            f"final train loss {min(losses):.3f}..{max(losses):.3f}"
            + (f"; {len(short)} with fewer steps than max_steps" if short else "")
        )
        for line in short:
            typer.echo(f"short member: {line}", err=True)


@app.command("finetune")
def finetune(config: Path = ConfigOpt, output_dir: Path = OutOpt, quiet: bool = QuietOpt) -> None:
    """Non-private baseline: one LoRA adapter on all parts together (saved to finetune/)."""
    from pmixed.train.finetune import train_finetune

    cfg = _start(config, output_dir, quiet)
    rec = train_finetune(cfg, progress=not quiet)
    _say(
        f"[bold]finetune[/bold] {rec['steps']} steps, train loss {rec['first_train_loss']:.3f} -> "
        f"{rec['final_train_loss']:.3f} ({rec['seconds']:.1f}s) -> {cfg.output_dir / 'finetune'}"
    )


@app.command("dpsgd")
def dpsgd(config: Path = ConfigOpt, output_dir: Path = OutOpt, quiet: bool = QuietOpt) -> None:
    """DP-SGD baseline with Opacus (saved to dpsgd/ with dpsgd.json)."""
    from pmixed.train.dpsgd import train_dpsgd

    cfg = _start(config, output_dir, quiet)
    rec = train_dpsgd(cfg, progress=not quiet)
    _say(
        f"[bold]dp-sgd[/bold] epsilon={rec['epsilon']:.3f} (target {rec['target_epsilon']}), "
        f"delta={rec['delta']:g}, noise multiplier {rec['noise_multiplier']:.3f}, "
        f"{rec['steps']} steps, train loss {rec['final_train_loss']:.3f} "
        f"({rec['seconds']:.1f}s) -> {cfg.output_dir / 'dpsgd'}"
    )


@app.command("dpsgd-unit")
def dpsgd_unit(config: Path = ConfigOpt, output_dir: Path = OutOpt, quiet: bool = QuietOpt) -> None:
    """DP-SGD at the privacy unit (one clipped gradient per unit per step; saved to dpsgd_unit/)."""
    from pmixed.train.dpsgd_unit import train_dpsgd_unit

    cfg = _start(config, output_dir, quiet)
    rec = train_dpsgd_unit(cfg, progress=not quiet)
    loss = "n/a" if rec["final_train_loss"] is None else f"{rec['final_train_loss']:.3f}"
    _say(
        f"[bold]dp-sgd per unit[/bold] epsilon={rec['epsilon']:.3f} (target {rec['target_epsilon']}), "
        f"delta={rec['delta']:g}, {rec['n_units']} units, q={rec['sample_rate']:.4f}, noise multiplier "
        f"{rec['noise_multiplier']:.3f}, {rec['steps']} steps, train loss {loss}, held-out PPL "
        f"{rec.get('eval_ppl_before', float('nan')):.2f} -> {rec.get('eval_ppl_after', float('nan')):.2f} "
        f"({rec['seconds']:.1f}s) -> {cfg.output_dir / 'dpsgd_unit'}"
    )


@app.command("pretrain")
def pretrain(config: Path = ConfigOpt, quiet: bool = QuietOpt) -> None:
    """Build (or find cached) the builtin:tiny-gpt2 base from the config's public_pretrain section."""
    from pmixed.train.public_pretrain import ensure_tiny_gpt2

    cfg = _start(config, None, quiet)
    t0 = time.perf_counter()
    path = ensure_tiny_gpt2(cfg.public_pretrain, progress=not quiet)
    metrics = json.loads((path / "pretrain.json").read_text())
    _say(
        f"[bold]tiny-gpt2[/bold] {path} (held-out perplexity {metrics['heldout_ppl_before']:.1f} -> "
        f"{metrics['heldout_ppl_after']:.1f}; {time.perf_counter() - t0:.1f}s)"
    )
