"""The ``pmixed`` command. Sub-commands live in sibling modules; heavy imports stay inside commands
so that ``pmixed --help`` is instant.

Exit codes: 0 success; 2 a usage or configuration error (the CLI framework's convention, also
:class:`~pmixed.errors.ConfigError` and :class:`~pmixed.errors.PromptTooLong`); the other
:class:`~pmixed.errors.PMixEDError` classes their own (3 budget exhausted, 4 ledger, 5 data,
6 ensemble mismatch, 7 asset); 130 interrupted. Every error is one line on stderr.
"""

from __future__ import annotations

import sys

import typer

from pmixed.errors import PMixEDError

app = typer.Typer(
    name="pmixed",
    help="Differentially private next-token prediction (PMixED).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def package_version() -> str:
    from pmixed import __version__

    return __version__


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pmixed {package_version()}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the package version and exit."),
) -> None:
    """Differentially private next-token prediction (PMixED)."""


def _register() -> None:
    from pmixed.cli import assets, privacy, train

    app.add_typer(privacy.app, name="privacy", help="Plan and inspect privacy budgets.")
    app.add_typer(assets.app, name="assets", help="Fetch and verify the offline default assets.")
    app.add_typer(train.app, name="train", help="Train the ensemble and the baselines.")
    from pmixed.cli import evaluate

    app.command("eval")(evaluate.eval_cmd)
    app.command("sweep")(evaluate.sweep_cmd)
    app.command("generate")(evaluate.generate_cmd)
    app.command("demo")(evaluate.demo_cmd)
    from pmixed.cli import tune

    app.command("tune")(tune.tune_cmd)
    from pmixed.cli import audit

    app.command("audit")(audit.audit_cmd)
    from pmixed.cli import serve

    app.command("serve")(serve.serve_cmd)
    app.add_typer(serve.app, name="keys", help="API keys of the server: create, list, revoke, reset.")


_register()


def usage_line(err: Exception) -> str:
    """A click/typer usage error as one line: what is wrong and where to look for help."""
    from typer._click.exceptions import NoArgsIsHelpError

    ctx = getattr(err, "ctx", None)
    path = ctx.command_path if ctx is not None else "pmixed"
    if isinstance(err, NoArgsIsHelpError):
        names = sorted(getattr(ctx.command, "commands", {}) or {}) if ctx is not None else []
        what = f"missing command (one of: {', '.join(names)})" if names else "missing arguments"
        return f"error: {what}; `{path} --help` says more"
    msg = " ".join(err.format_message().split())
    return f"error: {msg} (`{path} --help` says more)"


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the Typer app; every error becomes one line on stderr and its exit code."""
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="pmixed")
    except PMixEDError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except typer.Exit as ex:  # typer's own exits (--version)
        sys.exit(ex.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as err:  # click usage errors (typer vendors click): one line, exit 2
        print(usage_line(err) if hasattr(err, "ctx") else f"error: {err.format_message()}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
