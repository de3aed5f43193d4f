"""JSON files shared by schedules and calibrations: readable files, clear errors."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import numbers
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, ClassVar, TypeVar

from .errors import StepCacheError

# Files are small (a calibration of a large model is a few MB); these bound what a hostile or corrupt
# file can make the parser do. Nothing stepcache writes comes near them.
MAX_DEPTH = 64  # nesting of JSON arrays and objects
MAX_INT_DIGITS = 30  # digits of one JSON integer
# Bytes of one file read: a calibration of a 60-block video model with second-order forecasts at 100
# steps is tens of MB. A larger file is refused before it is read (a raw MemoryError otherwise).
MAX_FILE_BYTES = 256 * 2**20
_NAME_MAX, _PATH_MAX = 255, 4096  # where the platform does not say (os.pathconf)
FIFO_WAIT = 2.0  # seconds a named pipe written into may take to get a reader before it is refused
_TMP_SUFFIX = 14  # ".<name>.<8 hex>.tmp" adds a dot, a dot, 8 hex digits and ".tmp" to the name


def as_path(value: Any, what: str, error: type[StepCacheError] = StepCacheError) -> Path:
    """``value`` as a :class:`~pathlib.Path` (``~`` expanded), or ``error`` when it cannot be one: not a
    string or ``os.PathLike`` (bytes, a number, None), empty, or holding a NUL byte (which no file
    name can hold: ``os`` would raise a raw ``ValueError``)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise error(f"{what}: expected a path (a string or a pathlib.Path), got {kind_of(value)}.")
    if not value:
        raise error(f"{what}: the path is empty.")
    if "\0" in value:
        raise error(f"{what} path {value!r} holds a NUL byte, which no file name can hold.")
    return Path(value).expanduser()


def _limit(folder: Path, name: str, default: int) -> int:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return int(os.pathconf(folder, name))
    return default


def _check_length(path: Path, what: str, error: type[StepCacheError], ancestor: Path | None) -> None:
    """Names and paths the file system would refuse (ENAMETOOLONG), found before any work: with the
    usual limits, or those of the file system ``ancestor`` is on."""
    name_max = _NAME_MAX if ancestor is None else _limit(ancestor, "PC_NAME_MAX", _NAME_MAX)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            raise error(
                f"{what} {str(path)[:80]}...: the name {part[:40]!r}... is too long ({size} bytes; "
                f"names hold at most {name_max}): give a shorter name."
            )
    size = len(os.fsencode(str(path.absolute())))
    path_max = _PATH_MAX if ancestor is None else _limit(ancestor, "PC_PATH_MAX", _PATH_MAX)
    if size >= path_max:
        raise error(
            f"{what} {str(path)[:80]}...: the path is too long ({size} bytes; at most {path_max - 1}): "
            "give a shorter one."
        )


def _special(mode: int) -> str | None:
    """What a non-regular file is (None for a regular file or a folder)."""
    for test, name in (
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else "not a regular file"


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

    Checked without writing anything: a path that is not one (not a string, a NUL byte), a name or
    path too long for the file system, a folder given where a file is meant (and the reverse), a
    parent that is a file, a folder that cannot be written in, a read-only file, and a special file
    that cannot take one (a block device, a socket; a named pipe or a character device such as
    ``/dev/stdout`` is written into directly, never replaced). Commands call it before any work
    starts, so a bad output path never costs a calibration.
    """
    path = as_path(path, what, error)
    _check_length(path, what, error, None)  # before any stat: a long name is ENAMETOOLONG there
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
    _check_length(path, what, error, ancestor)  # the limits of the file system it will be on
    if not folder and path.exists():
        kind = _special(os.stat(path).st_mode)
        if kind in ("a block device", "a socket", "not a regular file"):
            raise error(f"cannot write {what} {path}: it is {kind}, not a file; give a file name.")
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

    A named pipe or a character device (``/dev/stdout``, a terminal) is never replaced: the data is
    written into it directly (not atomic: that is what writing to a pipe means). A pipe no process
    reads is refused at once instead of waiting for a reader.

    Raises:
        error: the path cannot be written (see :func:`check_output`) or the write failed (``OSError``).
    """
    path = check_output(path, what, error=error)
    target = Path(os.path.realpath(path))
    existed = target.exists()
    if existed and _special(os.stat(target).st_mode):
        _write_into(target, path, content, what, error)
        return path
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create the folder of {what} {path}: {e.strerror or e}.") from None
    stem, room = target.name, _limit(target.parent, "PC_NAME_MAX", _NAME_MAX) - _TMP_SUFFIX
    while len(os.fsencode(stem)) > room:  # a name near the limit: the temporary one is shortened
        stem = stem[:-1]
    tmp = target.parent / f".{stem}.{secrets.token_hex(4)}.tmp"
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


def _write_into(
    target: Path,
    path: Path,
    content: str | bytes | Callable[[IO[bytes]], None],
    what: str,
    error: type[StepCacheError],
) -> None:
    """Write into a named pipe or a character device directly: ``os.replace`` would swap the node
    itself for a regular file (as root, ``-o /dev/null`` would replace ``/dev/null``)."""
    fifo = stat.S_ISFIFO(os.stat(target).st_mode)
    flags = os.O_WRONLY | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    # A pipe opened for writing blocks until a reader comes; opened non-blocking, no reader is ENXIO:
    # wait a little for one (a reader started just after), then refuse rather than hang.
    deadline = time.monotonic() + FIFO_WAIT
    while True:
        try:
            fd = os.open(target, flags | (os.O_NONBLOCK if fifo else 0))
            break
        except OSError as e:
            if fifo and e.errno == errno.ENXIO and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            if fifo and e.errno == errno.ENXIO:
                raise error(
                    f"cannot write {what} {path}: it is a named pipe and no process is reading it "
                    "(nothing was written); start the reader first, or give a file name."
                ) from None
            raise error(f"cannot write {what} {path}: {e.strerror or e}.") from None
    try:
        if fifo:
            os.set_blocking(fd, True)
        with os.fdopen(fd, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode() if isinstance(content, str) else content)
    except OSError as e:
        raise error(
            f"cannot write {what} {path}: {e.strerror or e} (written directly into {_special(os.stat(target).st_mode)}: "
            "part of the data may have gone through)."
        ) from None


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
    except MemoryError:
        raise error(f"{source} is too large to parse in the memory available; not a {what} file.") from None
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
    """Read and strictly parse a JSON file (:func:`parse_json`); unreadable files raise ``error``.

    The file is checked before it is read: a regular file (a named pipe would block, a device never
    end) of at most :data:`MAX_FILE_BYTES`."""
    return parse_json(read_file(path, what, error), str(path), what, error)


def read_file(path: str | Path, what: str, error: type[StepCacheError]) -> bytes:
    """The bytes of a regular file of at most :data:`MAX_FILE_BYTES`, checked before reading."""
    path = as_path(path, f"{what} file", error)
    try:
        # Non-blocking: opening a named pipe for reading would otherwise wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise error(f"cannot read {what} file {path}: {e.strerror or e}.") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise error(f"cannot read {what} file {path}: it is a folder, not a file.")
        if not stat.S_ISREG(info.st_mode):
            raise error(
                f"cannot read {what} file {path}: it is {_special(info.st_mode)}, not a regular file."
            )
        limit = MAX_FILE_BYTES
        if info.st_size > limit:
            raise error(
                f"{what} file {path} holds {info.st_size} bytes, larger than the {limit} bytes a {what} "
                "file can hold: it is not one."
            )
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        raw = b"".join(chunks)
    except OSError as e:
        raise error(f"cannot read {what} file {path}: {e.strerror or e}.") from None
    finally:
        os.close(fd)
    if len(raw) > limit:  # it grew while being read
        raise error(f"{what} file {path} is larger than the {limit} bytes a {what} file can hold.")
    return raw


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
