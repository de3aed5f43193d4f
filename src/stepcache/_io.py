"""JSON files shared by schedules and calibrations: readable files, clear errors, Hub methods."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .errors import StepCacheError


def dump(data: Any) -> str:
    """JSON with each list of numbers on one line, so files stay readable and diffable."""
    text = json.dumps(data, indent=2, allow_nan=False)
    return (
        re.sub(r"\[\s+([-\d.eE+,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
        + "\n"
    )


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as readable JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump(data))
    return path


def read_json(path: str | Path, what: str, error: type[StepCacheError]) -> Any:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise error(f"cannot read {what} file {path}: {e.strerror or e}.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
            f"the {what} file is corrupt or truncated: regenerate it."
        ) from None


T = TypeVar("T", bound="JsonValue")

# Prefixed so they can sit in a model repo or folder (next to model_index.json) without clashing.
SCHEDULE_FILE = "stepcache_schedule.json"
CALIBRATION_FILE = "stepcache_calibration.json"


class JsonValue:
    """Files for a plain value (a :class:`~stepcache.Schedule`, a :class:`~stepcache.Calibration`):
    JSON on disk, and the ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` trio that
    keeps it next to its model, in a folder or a Hub repo (see :mod:`stepcache.integrations.hub`).

    A subclass names what it is (``_what``), its error type and its default file name, and
    provides ``to_dict`` / ``from_dict``.
    """

    _what: ClassVar[str]
    _error: ClassVar[type[StepCacheError]]
    _default_file: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[T], data: Any, *, source: str = "file") -> T:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write this value as readable JSON (parent folders are created)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        """Read a file written by :meth:`save`."""
        return cls.from_dict(read_json(path, cls._what, cls._error), source=str(path))

    @classmethod
    def from_pretrained(
        cls: type[T],
        repo_id_or_path: str | os.PathLike[str],
        filename: str | None = None,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> T:
        """The value stored as ``filename`` (default ``stepcache_<kind>.json``) in a file, a model
        folder or a Hub repo: it belongs with the model it was made for, so it is looked up where
        the model lives (see :func:`stepcache.integrations.hub.resolve_file`)."""
        from .integrations.hub import resolve_file

        path = resolve_file(
            repo_id_or_path,
            filename or cls._default_file,
            subfolder=subfolder,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            error=cls._error,
        )
        return cls.load(path)

    def save_pretrained(self, save_directory: str | Path, filename: str | None = None) -> Path:
        """Write this value into a (model) folder, where :meth:`from_pretrained` finds it."""
        from .integrations.hub import save_pretrained

        return save_pretrained(self, save_directory, filename)  # type: ignore[arg-type]

    def push_to_hub(
        self,
        repo_id: str,
        *,
        filename: str | None = None,
        subfolder: str | None = None,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> str:
        """Upload this value to a Hub model repo (created if needed) for others to
        :meth:`from_pretrained`; returns the commit URL."""
        from .integrations.hub import push_to_hub

        return push_to_hub(
            self,  # type: ignore[arg-type]
            repo_id,
            filename=filename,
            subfolder=subfolder,
            commit_message=commit_message,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
