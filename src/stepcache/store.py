"""The calibration store: what caching without a schedule recorded, kept for the next generation and
the next process.

It lives in ``$STEPCACHE_HOME`` (default ``~/.cache/stepcache``, the way ``HF_HOME`` works), one file
per key under ``calibrations/``: ``<id>.json``, a :class:`~stepcache.Calibration` whose
``meta["store"]`` holds the key it was recorded for and its id (the first 16 hex digits of the key's
SHA-256). The key is everything that changes the error curves: the model (fingerprint, weights digest,
adapters, dtype), the components cached, the scheduler and its config, the step count, the guidance
scale (bucketed) and the latent shape (:mod:`stepcache.auto` makes it).

Writes are atomic (a reader sees the old file or the new one) and go through a file lock per key, so
processes that calibrate the same key at once leave one valid entry: the first one written is kept.
An entry that cannot be read, or holds another key, is refused with a warning, and the key is
calibrated anew (the new entry replaces it). ``stepcache store list | show | remove | export`` manages
the store; ``export`` writes a folder that ``push_to_hub`` (or ``huggingface_hub.upload_folder``) can
share. See docs/store.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from filelock import Timeout as LockTimeout

from ._io import CALIBRATION_FILE, atomic_write, check_output
from .calibration import Calibration
from .errors import CalibrationError, StepCacheError, StepCacheWarning, StoreError

__all__ = ["ENV", "Entry", "Store", "describe", "home", "key_id"]

ENV = "STEPCACHE_HOME"
_DEFAULT_HOME = "~/.cache/stepcache"
_LOCK_SECONDS = 120.0  # a write holds the lock for the time of one JSON file: far less than this


def home() -> Path:
    """The store's folder: ``$STEPCACHE_HOME``, else ``~/.cache/stepcache``."""
    return Path(os.environ.get(ENV) or _DEFAULT_HOME).expanduser()


def key_id(key: Mapping[str, Any]) -> str:
    """The id of a key: the first 16 hex digits of the SHA-256 of its canonical JSON."""
    text = json.dumps(dict(key), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(key: Mapping[str, Any]) -> str:
    """A key in a few words: model, scheduler, steps, guidance, latent shape."""
    shape = key.get("latent_shape")
    guidance = key.get("guidance")
    parts = [
        str(key.get("model_class", "?")),
        str(key.get("scheduler") or "no scheduler"),
        f"{key['steps']} steps" if key.get("steps") else "step count unknown yet",
        "no guidance scale" if guidance is None else f"guidance {guidance:g}",
        "latent " + ("x".join(str(d) for d in shape) if shape else "?"),
    ]
    return ", ".join(parts)


@dataclass(frozen=True)
class Entry:
    """One file of the store.

    Attributes:
        id: the key's id (the file's name without ``.json``).
        path: the file.
        key: the key it was recorded for (None when the file cannot be read).
        calibration: the calibration (None when the file cannot be read).
        problem: why the entry is refused (None: it is valid).
        size: bytes on disk.
        modified: when it was written (seconds since the epoch).
    """

    id: str
    path: Path
    key: Mapping[str, Any] | None
    calibration: Calibration | None
    problem: str | None
    size: int
    modified: float

    @property
    def description(self) -> str:
        return describe(self.key) if self.key is not None else "(unreadable)"


class Store:
    """The calibrations in a folder (default :func:`home`), one file per key."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else home()
        self.folder = self.root / "calibrations"

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def path(self, key: Mapping[str, Any]) -> Path:
        """The file that holds (or will hold) ``key``'s calibration."""
        return self.folder / f"{key_id(key)}.json"

    # ---------------------------------------------------------------- reading
    def get(self, key: Mapping[str, Any]) -> Calibration | None:
        """The calibration stored for ``key``; None when there is none, or (with a
        :class:`~stepcache.StepCacheWarning`) when the entry is corrupt or holds another key."""
        path = self.path(key)
        if not path.is_file():
            return None
        entry = self._read(path)
        problem = entry.problem or _mismatch(entry, key)
        if problem is not None:
            warnings.warn(
                f"refusing the stored calibration {path}: {problem}. Calibrating anew (the new entry "
                "replaces it).",
                StepCacheWarning,
                stacklevel=2,
            )
            return None
        return entry.calibration

    def entries(self) -> list[Entry]:
        """Every entry, newest first; unreadable ones included, with their problem."""
        if not self.folder.is_dir():
            return []
        found = [self._read(p) for p in self.folder.glob("*.json") if p.is_file()]
        return sorted(found, key=lambda e: (-e.modified, e.id))

    def find(self, ref: str) -> Entry:
        """The entry whose id is ``ref`` or starts with it (at least 4 hex digits).

        Raises:
            StoreError: no entry, or several, match.
        """
        ref = ref.strip().lower()
        if ref.endswith(".json"):
            ref = ref[: -len(".json")]
        if len(ref) < 4 or any(c not in "0123456789abcdef" for c in ref):
            raise StoreError(
                f"{ref!r} is not an entry id: give the id 'stepcache store list' shows (4 hex digits or more)."
            )
        matches = [e for e in self.entries() if e.id.startswith(ref)]
        if not matches:
            raise StoreError(
                f"no stored calibration {ref!r} in {self.folder} ('stepcache store list' shows what there is)."
            )
        if len(matches) > 1:
            raise StoreError(
                f"{ref!r} matches {len(matches)} entries ({', '.join(e.id for e in matches[:4])}): "
                "give more digits."
            )
        return matches[0]

    # ---------------------------------------------------------------- writing
    def put(self, key: Mapping[str, Any], calibration: Calibration) -> Calibration:
        """Store ``calibration`` for ``key`` and return the stored one.

        Under the key's file lock: when another process stored a valid calibration for this key in the
        meantime, that one is kept and returned; otherwise (no entry, or a refused one) this one is
        written, atomically.

        Raises:
            StoreError: the store cannot be written (its folder, permissions, the disk, the lock).
        """
        if not isinstance(calibration, Calibration):
            raise StoreError(f"the store keeps calibrations, got {type(calibration).__name__}.")
        path = self.path(key)
        ident = key_id(key)
        with self._lock(ident):
            if path.is_file():
                entry = self._read(path)
                if entry.problem is None and _mismatch(entry, key) is None:
                    assert entry.calibration is not None
                    return entry.calibration
            stored = calibration.replace(
                meta={**calibration.meta, "store": {"id": ident, "key": json.loads(json.dumps(dict(key)))}}
            )
            try:
                stored.save(path)
            except StepCacheError as e:
                raise StoreError(f"cannot store the calibration in {self.folder}: {e}") from None
        return stored

    def remove(self, ref: str) -> Entry:
        """Delete the entry ``ref`` (an id or its prefix, see :meth:`find`); returns it."""
        entry = self.find(ref)
        with self._lock(entry.id):
            try:
                entry.path.unlink(missing_ok=True)
            except OSError as e:
                raise StoreError(f"cannot remove {entry.path}: {e.strerror or e}.") from None
        return entry

    def export(self, ref: str, folder: str | os.PathLike[str]) -> Path:
        """Write the entry ``ref`` into ``folder`` as ``stepcache_calibration.json`` with a README: a
        folder ``Calibration.from_pretrained`` reads and ``push_to_hub`` / ``upload_folder`` share.

        Raises:
            StoreError: no such entry, it is refused, or the folder cannot be written.
        """
        entry = self.find(ref)
        if entry.problem is not None or entry.calibration is None:
            raise StoreError(f"the stored calibration {entry.id} is refused: {entry.problem}.")
        out = Path(folder).expanduser()
        try:
            check_output(out, "export folder", folder=True, error=StoreError)
            entry.calibration.save(out / CALIBRATION_FILE)
            atomic_write(out / "README.md", _readme(entry), what="README", error=StoreError)
        except StepCacheError as e:
            raise StoreError(str(e)) from None
        return out

    # ---------------------------------------------------------------- internals
    def _lock(self, ident: str) -> _Locked:
        locks = self.root / "locks"
        try:
            locks.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the store's folder {locks}: {e.strerror or e}.") from None
        return _Locked(FileLock(str(locks / f"{ident}.lock"), timeout=_LOCK_SECONDS), locks)

    def _read(self, path: Path) -> Entry:
        try:
            stat = path.stat()
            size, modified = stat.st_size, stat.st_mtime
        except OSError:
            size, modified = 0, 0.0
        ident = path.stem
        try:
            cal = Calibration.load(path)
        except CalibrationError as e:
            return Entry(ident, path, None, None, f"it cannot be read ({e})", size, modified)
        info = cal.meta.get("store")
        key = info.get("key") if isinstance(info, Mapping) else None
        if not isinstance(key, Mapping):
            return Entry(ident, path, None, cal, "it records no store key (meta['store'])", size, modified)
        if key_id(key) != ident:
            problem = f"its key has id {key_id(key)}, not its file name's {ident}"
            return Entry(ident, path, key, cal, problem, size, modified)
        return Entry(ident, path, key, cal, None, size, modified)


class _Locked:
    """The key's file lock as a context manager whose failures are :class:`StoreError`."""

    def __init__(self, lock: FileLock, folder: Path) -> None:
        self._lock, self._folder = lock, folder

    def __enter__(self) -> None:
        try:
            self._lock.acquire()
        except LockTimeout:
            raise StoreError(
                f"another process has held the store's lock {self._lock.lock_file} for over "
                f"{_LOCK_SECONDS:.0f} s: if none is running, delete that file."
            ) from None
        except OSError as e:
            raise StoreError(f"cannot lock the store in {self._folder}: {e.strerror or e}.") from None

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _mismatch(entry: Entry, key: Mapping[str, Any]) -> str | None:
    """Why ``entry`` does not answer ``key`` (None: it does)."""
    if entry.key is None:
        return "it records no key"
    if key_id(entry.key) != key_id(key):
        return f"it holds another key ({describe(entry.key)})"
    return None


def _readme(entry: Entry) -> str:
    cal = entry.calibration
    assert cal is not None and entry.key is not None
    key = json.dumps(dict(entry.key), indent=2, sort_keys=True)
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.modified))
    return f"""---
library_name: stepcache
tags:
- stepcache
- diffusion-caching
---
# stepcache calibration {entry.id}

{describe(entry.key)}; recorded {created} over {cal.num_samples} generation(s), lookahead {cal.lookahead}.

`stepcache_calibration.json` holds per-step error curves of every cached component, recorded on an
uncached generation. Put it in the model's repository or folder (or upload this folder with
`huggingface_hub.upload_folder`) and `stepcache.cache(pipe, compute_fraction=0.5)` uses it from the
first generation whenever the key below matches; or read it yourself:

```python
cal = stepcache.Calibration.from_pretrained("this/repo")
schedule = stepcache.optimal_schedule(cal, 0.5)
```

## Key

```json
{key}
```

## Summary

```
{cal.summary()}
```
"""
