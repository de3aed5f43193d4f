"""JSON files shared by schedules and calibrations: readable files, clear errors."""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, ClassVar, TypeVar

from .errors import StepCacheError

# Files are small (a calibration of a large model is a few MB); these bound what a hostile or corrupt
# file can make the parser do. Nothing stepcache writes comes near them.
MAX_DEPTH = 64  # nesting of JSON arrays and objects
MAX_INT_DIGITS = 30  # digits of one JSON integer


def dump(data: Any) -> str:
    """JSON with each list of numbers on one line, so files stay readable and diffable."""
    text = json.dumps(data, indent=2, allow_nan=False)
    return (
        re.sub(r"\[\s+([-\d.eE+,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
        + "\n"
    )


def check_output(
    path: str | Path, what: str, *, folder: bool = False, error: type[StepCacheError] = StepCacheError
) -> Path:
    """Raise ``error`` unless ``path`` can be written (``folder=True``: created or filled) as ``what``.

    Checked without writing anything: a folder given where a file is meant (and the reverse), a parent
    that is a file, a folder that cannot be written in, a read-only file. Commands call it before any
    work starts, so a bad output path never costs a calibration.
    """
    path = Path(path).expanduser()
    if folder:
        if path.exists() and not path.is_dir():
            raise error(f"{what} {path} is a file, not a folder: give a folder to write into.")
    elif path.is_dir():
        raise error(f"{what} {path} is a folder: give a file name, e.g. {path / 'out.json'}.")
    ancestor = path if folder and path.is_dir() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise error(f"cannot create {what} {path}: {ancestor} is a file, not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise error(f"cannot write {what} {path}: no permission to write in {ancestor}.")
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise error(f"cannot write {what} {path}: the file is read-only.")
    return path


def atomic_write(
    path: str | Path,
    content: str | bytes | Callable[[IO[bytes]], None],
    *,
    what: str = "file",
    error: type[StepCacheError] = StepCacheError,
) -> Path:
    """Write ``content`` (text, bytes, or a function writing to a binary file) to ``path`` atomically.

    The data goes to a hidden temporary file in the same folder, is flushed to disk (fsync), and then
    replaces ``path`` in one step (``os.replace``). Readers see the old file or the new one, never a
    mix; if anything fails (disk full, quota, an exception of ``content``) the old file is left exactly
    as it was and the temporary file is removed. Parent folders are created; an existing file keeps
    its permissions; a symbolic link keeps pointing where it did (its target is replaced).

    Raises:
        error: the path cannot be written (see :func:`check_output`) or the write failed (``OSError``).
    """
    path = check_output(path, what, error=error)
    target = Path(os.path.realpath(path))
    existed = target.exists()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create the folder of {what} {path}: {e.strerror or e}.") from None
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise error(f"cannot write {what} {path}: {e.strerror or e}.") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode() if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        if existed:
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            kept = "the previous file is unchanged" if existed else "nothing was written"
            raise error(f"cannot write {what} {path}: {e.strerror or e} ({kept}).") from None
        raise
    _fsync_folder(target.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable where the platform allows it (POSIX); best effort."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(
    path: str | Path, data: Any, *, what: str = "file", error: type[StepCacheError] = StepCacheError
) -> Path:
    """Write ``data`` as readable JSON, atomically (:func:`atomic_write`), creating parent folders."""
    try:
        text = dump(data)
    except (TypeError, ValueError) as e:  # a NaN or an object JSON cannot store, in meta for instance
        raise error(f"cannot write {what} {path}: {e}. Keep meta to JSON values (finite numbers).") from None
    return atomic_write(path, text, what=what, error=error)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer with {len(text.lstrip('-'))} digits is too large")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _depth(data: Any) -> int:
    """Nesting depth of parsed JSON (iterative: no recursion on hostile input)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def parse_json(text: str | bytes, source: str, what: str, error: type[StepCacheError]) -> Any:
    """Parse strict JSON: UTF-8, no NaN/Infinity, no duplicate keys, bounded integers and nesting.

    Every failure is an ``error`` naming ``source`` and what is wrong, never another exception.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise error(
                f"{source} is not UTF-8 text (byte {e.start}): the {what} file is corrupt or not JSON."
            ) from None
    try:
        data = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as e:
        raise error(
            f"{source} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
            f"the {what} file is corrupt or truncated: regenerate it."
        ) from None
    except RecursionError:
        raise error(f"{source} nests arrays or objects too deeply to be a {what} file.") from None
    except ValueError as e:
        raise error(f"{source} is not a valid {what} file: {e}.") from None
    if _depth(data) > MAX_DEPTH:
        raise error(f"{source} nests arrays or objects more than {MAX_DEPTH} deep; not a {what} file.")
    return data


def is_int(value: Any) -> bool:
    """An integer, exactly: ``True``, ``1.0`` and ``"1"`` are not (numpy integers are)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number that is not a bool (NaN and infinities included: callers check ranges)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def kind_of(value: Any) -> str:
    """How a (JSON) value looks, for error messages: ``a string 'x'``, ``an integer 3``, ``null``."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}
    names[dict] = "an object"
    shown = f" {value!r}" if is_number(value) or (isinstance(value, str) and len(value) < 40) else ""
    return names.get(type(value), type(value).__name__) + shown


def check_format_version(data: dict, source: str, error: type[StepCacheError], current: int) -> None:
    """A file's ``format_version`` (optional, for hand-written files) must be an integer we can read."""
    if "format_version" not in data:
        return
    version = data["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise error(f"{source}: format_version must be a positive integer, got {version!r}.")
    if version > current:
        raise error(
            f"{source} has format_version {version}, newer than the {current} this stepcache reads: "
            "upgrade stepcache to read it."
        )


def read_json(path: str | Path, what: str, error: type[StepCacheError]) -> Any:
    """Read and strictly parse a JSON file (:func:`parse_json`); unreadable files raise ``error``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {what} file {path}: {e.strerror or e}.") from None
    return parse_json(raw, str(path), what, error)


T = TypeVar("T", bound="JsonValue")

# Prefixed so they can sit in a model repo or folder (next to model_index.json) without clashing.
SCHEDULE_FILE = "stepcache_schedule.json"
CALIBRATION_FILE = "stepcache_calibration.json"


class JsonValue:
    """Files for a plain value (a :class:`~stepcache.Schedule`, a :class:`~stepcache.Calibration`):
    JSON on disk. :class:`stepcache._hub.HubValue` adds the ``from_pretrained`` / ``save_pretrained`` /
    ``push_to_hub`` trio that keeps it next to its model, in a folder or a Hub repo.

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
        """Write this value as readable JSON, atomically: a failed write leaves an existing file
        untouched (parent folders are created)."""
        return write_json(path, self.to_dict(), what=f"{self._what} file", error=self._error)

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        """Read a file written by :meth:`save`."""
        return cls.from_dict(read_json(path, cls._what, cls._error), source=str(path))
