"""Where the ComfyUI nodes keep calibrations and schedules: ComfyUI's models folder.

The folder is ComfyUI's model folder type ``stepcache`` (``models/stepcache`` by default), registered
with ``folder_paths`` on first use; like every model folder it can be moved or added to in
``extra_model_paths.yaml`` (``stepcache: path/to/folder``). ``folder_paths`` is imported here, on
first use, never when stepcache is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["FOLDER", "find", "folders", "listing", "resolve", "target"]

FOLDER = "stepcache"
EXTENSIONS = {".json"}


def folders() -> list[str]:
    """ComfyUI's ``stepcache`` model folders, the first one where new files go."""
    import folder_paths

    if FOLDER not in folder_paths.folder_names_and_paths:
        default = os.path.join(folder_paths.models_dir, FOLDER)
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))
    return folder_paths.get_folder_paths(FOLDER)


def find(filename: str, folder: str | None = None) -> Path | None:
    """The file ``filename`` in ``folder`` (default: the stepcache model folders), or None."""
    for base in [folder] if folder else folders():
        path = Path(base) / filename
        if path.is_file():
            return path
    return None


def target(filename: str, folder: str | None = None) -> Path:
    """Where a new file ``filename`` is written (its folder is created)."""
    base = Path(folder) if folder else Path(folders()[0])
    base.mkdir(parents=True, exist_ok=True)
    return base / filename


def listing() -> list[str]:
    """The files of the stepcache model folders (for a node's file list)."""
    import folder_paths

    folders()
    return folder_paths.get_filename_list(FOLDER)


def resolve(name: str) -> Path:
    """A file named in a node: a file of the stepcache model folders, or a path."""
    found = find(name)
    if found is not None:
        return found
    path = Path(name).expanduser()
    if path.is_file():
        return path
    raise FileNotFoundError(f"no file {name!r} in the stepcache model folders {folders()} (nor as a path).")
