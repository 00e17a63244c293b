"""`pmixed assets ...` commands."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)

_CACHE_HELP = "Cache folder (default: $PMIXED_CACHE or ~/.cache/pmixed)."


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


@app.command("fetch")
def fetch(
    only: list[str] | None = typer.Option(
        None, "--only", help="Fetch only this asset (repeatable). Default: all of them."
    ),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=_CACHE_HELP),
    force: bool = typer.Option(False, "--force", help="Fetch again even if already complete."),
) -> None:
    """Download, verify (sha256) and install the offline default assets. Idempotent."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from pmixed import assets

    names = list(dict.fromkeys(only)) if only else list(assets.ASSETS)
    for n in names:
        assets._spec(n)  # unknown names fail before anything is downloaded
    out = Console(soft_wrap=True)
    err = Console(stderr=True)
    tasks: dict[str, int] = {}
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[asset]:<15}"),
        BarColumn(bar_width=20),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as progress:
        for n in names:
            tasks[n] = progress.add_task(
                "waiting", asset=n, total=len(assets._STEPS[n]), start=False
            )

        def report(name: str, step: str, done: int, total: int) -> None:
            task = tasks[name]
            progress.start_task(task)
            progress.update(task, description=step, completed=done, total=total)

        results = []
        for n in names:
            results.append(assets.fetch_asset(n, cache_dir=cache_dir, force=force, reporter=report))
    for r in results:
        if r.status == "cached":
            out.print(f"{r.name}: already fetched, nothing to do ({r.path})")
        else:
            out.print(f"{r.name}: fetched and verified in {r.seconds:.1f} s ({r.path})")


@app.command("list")
def list_assets(
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=_CACHE_HELP),
) -> None:
    """List the assets, their pinned sources and whether they are in the cache."""
    from rich.console import Console
    from rich.table import Table

    from pmixed import assets

    table = Table(title=f"pmixed assets in {assets.cache_root(cache_dir)}")
    for col in ("name", "source", "download", "licence", "status"):
        table.add_column(col)
    for row in assets.asset_status(cache_dir):
        status = "[green]fetched[/green]" if row["fetched"] else "[yellow]missing[/yellow]"
        table.add_row(
            row["name"], row["source"], _size(row["download_bytes"]), row["licence"], status
        )
    Console(width=140).print(table)


@app.command("path")
def path(
    name: str = typer.Argument(..., help="Asset name."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help=_CACHE_HELP),
) -> None:
    """Print the folder of a fetched asset (fails if it is not fetched)."""
    from pmixed import assets

    typer.echo(str(assets.asset_path(name, cache_dir)))
