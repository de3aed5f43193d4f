"""The ``stepcache`` command line: generate, info, calibrate, schedule, tune, plan-memory, demo and store,
one module each;
``_targets`` turns MODEL into a pipeline and builds its inputs, ``_common`` holds the shared checks.

``MODEL`` is ``reference`` (the shipped trained 16x16-digits DiTs: ``--model ddpm``, the default, or
``--model flow``, the flow-matching one), ``tiny-dit`` (a built-in
random-weight DiT pipeline), a diffusers model id or local folder (loading a hub id needs hub
access), or ``module:factory`` (a function returning a pipeline or a denoiser module).

Bad input never ends in a traceback: every option is checked (and output paths are checked)
before any work starts, and every error is one line on stderr with exit code 2 saying what is wrong
and what to do. Options a command would ignore in the mode asked for are refused, not dropped.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from . import calibrate, demo, generate, info, plan_memory, schedule, store, tune
from ._common import ClickException, NoArgsIsHelp, one_line

_verbose = False


class _OneLineErrors(TyperGroup):
    """Usage errors (a bad value, an unknown option, a missing argument) on one line with a pointer
    to ``--help``, instead of click's usage block; anything unexpected on one line with exit code 1
    (``--verbose`` shows the traceback)."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except ClickException as e:
            if NoArgsIsHelp is not None and isinstance(e, NoArgsIsHelp):
                e.show()  # type: ignore[attr-defined]
                sys.exit(2)
            ctx = getattr(e, "ctx", None)
            hint = f" See '{ctx.command_path} --help'." if ctx is not None else ""
            message = one_line(e.format_message())  # type: ignore[attr-defined]
            typer.secho(
                f"error: {message}{'' if message.endswith('.') else '.'}{hint}",
                fg=typer.colors.RED,
                err=True,
            )
            sys.exit(getattr(e, "exit_code", 2))
        except typer.Abort:
            typer.secho("aborted.", fg=typer.colors.RED, err=True)
            sys.exit(1)
        except Exception as e:
            if _verbose:
                raise
            typer.secho(
                f"error: unexpected {type(e).__name__}: {one_line(str(e))} (this is a bug of stepcache or "
                "of the model; rerun with --verbose for the traceback and report it).",
                fg=typer.colors.RED,
                err=True,
            )
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="stepcache",
    cls=_OneLineErrors,
    help="Training-free step caching (SmoothCache and beyond) for diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log at INFO level; show tracebacks of unexpected errors.")
    ] = False,
) -> None:
    global _verbose
    _verbose = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


# The commands, in the order --help lists them: one module each.
app.command()(generate.generate)
app.command()(info.info)
app.command()(calibrate.calibrate)
app.command()(schedule.schedule)
app.command()(tune.tune)
app.command("plan-memory")(plan_memory.plan_memory)
app.command()(demo.demo)
app.add_typer(store.app, name="store")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
