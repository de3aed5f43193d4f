"""``stepcache store list | show | remove | export``: the calibrations that caching without a schedule
recorded, in ``$STEPCACHE_HOME`` (default ``~/.cache/stepcache``; docs/store.md)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from .._io import SCHEDULE_FILE
from ..errors import StepCacheError
from ..policies import check_fraction, open_loop_schedule
from ..store import Entry, Store
from ._common import checked, fail, relay_warnings

app = typer.Typer(
    name="store",
    help="The calibrations stepcache recorded and remembers ($STEPCACHE_HOME, default ~/.cache/stepcache).",
    no_args_is_help=True,
)

IdArg = Annotated[
    str, typer.Argument(help="An entry's id, as `stepcache store list` shows it (or its first digits).")
]


def _when(entry: Entry) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.modified)) if entry.modified else "?"


@app.command("list")
def list_entries() -> None:
    """List the stored calibrations: id, when, size and what they were recorded for."""
    store = Store()
    entries = store.entries()
    if not entries:
        typer.echo(f"no calibrations stored in {store.folder}")
        return
    typer.echo(f"{len(entries)} calibration(s) in {store.folder}")
    for e in entries:
        what = e.description if e.problem is None else f"REFUSED: {e.problem}"
        typer.echo(f"{e.id}  {_when(e)}  {e.size / 1024:7.1f} KiB  {what}")


@app.command()
def show(entry: IdArg) -> None:
    """Show one stored calibration: its key and its error curves in brief."""
    try:
        found = Store().find(entry)
    except StepCacheError as e:
        fail(e)
    typer.echo(f"{found.id}: {found.path} ({found.size / 1024:.1f} KiB, written {_when(found)})")
    if found.problem is not None:
        fail(f"the stored calibration {found.id} is refused: {found.problem}.")
    assert found.calibration is not None and found.key is not None
    typer.echo(f"key: {found.description}")
    typer.echo(json.dumps(dict(found.key), indent=2, sort_keys=True))
    typer.echo(found.calibration.summary())


@app.command()
def remove(
    entry: Annotated[str | None, typer.Argument(help="An entry's id (or its first digits).")] = None,
    all_entries: Annotated[bool, typer.Option("--all", help="Remove every stored calibration.")] = False,
) -> None:
    """Remove a stored calibration (the next generation of its kind calibrates anew)."""
    if (entry is None) == (not all_entries):
        fail("give one entry id, or --all (not both).")
    store = Store()
    try:
        ids = [e.id for e in store.entries()] if all_entries else [entry or ""]
        for ref in ids:
            gone = store.remove(ref)
            typer.echo(f"removed {gone.id} ({gone.description})")
    except StepCacheError as e:
        fail(e)
    if all_entries and not ids:
        typer.echo(f"no calibrations stored in {store.folder}")


@app.command()
def export(
    entry: IdArg,
    folder: Annotated[Path, typer.Argument(help="Folder to write (created if needed).")],
    compute_fraction: Annotated[
        float | None,
        typer.Option(
            help="Also write the schedule for this compute fraction (stepcache_schedule.json).",
            callback=checked(check_fraction),
        ),
    ] = None,
) -> None:
    """Write a stored calibration into FOLDER (stepcache_calibration.json and a README): a folder to keep
    beside the model or share with `huggingface_hub.upload_folder` / `push_to_hub`."""
    store = Store()
    try:
        with relay_warnings():
            out = store.export(entry, folder)
            typer.echo(f"wrote {out / 'stepcache_calibration.json'}")
            if compute_fraction is not None:
                calibration = store.find(entry).calibration
                assert calibration is not None
                schedule = open_loop_schedule(calibration, compute_fraction)
                schedule.save(out / SCHEDULE_FILE)
                typer.echo(f"wrote {out / SCHEDULE_FILE} (compute fraction {schedule.compute_fraction:.3f})")
    except StepCacheError as e:
        fail(e)
