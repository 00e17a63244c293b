"""The ``pmixed`` command. Sub-commands live in sibling modules; heavy imports stay inside commands
so that ``pmixed --help`` is instant."""

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


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the Typer app, turning :class:`PMixEDError` into a one-line message."""
    try:
        app(args=argv, standalone_mode=False)
    except PMixEDError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except typer.Exit as ex:  # pragma: no cover - typer's own exits
        sys.exit(ex.exit_code)
    except SystemExit:
        raise
    except Exception as err:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            print("aborted", file=sys.stderr)
            sys.exit(130)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
