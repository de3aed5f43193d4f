"""What every command shares: one-line errors (exit code 2), argument checks as typer callbacks, the
check of output paths before any work, refusing options a mode would ignore, and the options and lines
about memory budgets."""

from __future__ import annotations

import importlib
import math
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from .._io import check_output
from ..errors import StepCacheError
from ..memory import parse_bytes

# typer >= 0.2x vendors click (typer._click); older typer uses click itself. Take whichever it raises.
_click_errors = sys.modules[typer.BadParameter.__module__]
ClickException: type[Exception] = _click_errors.ClickException
NoArgsIsHelp: type[Exception] | None = getattr(_click_errors, "NoArgsIsHelpError", None)
_ParameterSource = importlib.import_module(
    _click_errors.__name__.rpartition(".")[0] + ".core"
).ParameterSource


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(e: Exception | str) -> NoReturn:
    """One line on stderr, exit code 2: what is wrong and what to do."""
    typer.secho(f"error: {one_line(str(e))}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@contextmanager
def relay_warnings() -> Iterator[None]:
    """Warnings of stepcache (a lossy export, say) as one ``warning:`` line each on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        typer.secho(f"warning: {one_line(str(w.message))}", fg=typer.colors.YELLOW, err=True)


def given(ctx: typer.Context, *names: str) -> list[str]:
    """The options among ``names`` set on the command line (rather than left at their default)."""
    return [
        "--" + name.replace("_", "-")
        for name in names
        if ctx.get_parameter_source(name) not in (None, _ParameterSource.DEFAULT)
    ]


def refuse_unused(ctx: typer.Context, names: tuple[str, ...], why: str) -> None:
    options = given(ctx, *names)
    if options:
        fail(
            f"{', '.join(options)} {'is' if len(options) == 1 else 'are'} unused {why}: leave {'it' if len(options) == 1 else 'them'} out."
        )


def checked(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A typer callback from one of stepcache's argument checks (None passes: option not given)."""

    def callback(value: Any) -> Any:
        if value is not None:
            try:
                check(value)
            except StepCacheError as e:
                raise typer.BadParameter(str(e)) from None
        return value

    return callback


def choice(*names: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        values = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if v not in names]
        if bad:
            raise StepCacheError(f"must be one of {', '.join(names)}, got {bad[0]!r}.")

    return check


def check_finite(value: float) -> None:
    if not math.isfinite(value):
        raise StepCacheError(f"must be a finite number, got {value}.")


def check_budget(value: str) -> None:
    parse_bytes(value, what="--memory-budget")


def check_outputs(*paths: tuple[Path | None, str], inputs: tuple[Path | None, ...] = ()) -> None:
    """Check every output path before any work: writable, and no two the same (nor an input)."""
    seen: dict[Path, str] = {}
    for path, what in paths:
        if path is None:
            continue
        try:
            check_output(path, what)
        except StepCacheError as e:
            fail(e)
        key = path.expanduser().resolve()
        if key in seen:
            fail(f"{what} and {seen[key]} are the same file {path}: give them different names.")
        if any(i is not None and key == i.expanduser().resolve() for i in inputs):
            fail(f"{what} {path} is also an input of this command: write to another file.")
        seen[key] = what


MemoryBudgetOpt = Annotated[
    str | None,
    typer.Option(
        help="Bytes the stored outputs may hold at once, e.g. 16GB or 512MiB: the schedule is fitted to it "
        "(it may compute more when the budget is tight; the output says).",
        callback=checked(check_budget),
    ),
]


def memory_line(info: dict[str, Any]) -> str:
    """What fitting a schedule to --memory-budget gave, in one line."""
    line = (
        f"memory: predicted peak {info['predicted_peak'] / 2**20:.2f} MiB within the budget "
        f"{info['budget'] / 2**20:.2f} MiB (every output kept: {info['unplanned_peak'] / 2**20:.2f} MiB)"
    )
    if info.get("changed"):
        line += (
            f"; fitted: compute fraction {info['compute_fraction']:.3f} "
            f"(asked {info['asked_compute_fraction']:.3f})"
        )
    return line
