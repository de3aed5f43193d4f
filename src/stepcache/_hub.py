"""Schedules and calibrations on the Hugging Face Hub, or in a model folder.

A schedule is tied to a model (and a calibration is recorded on one), so the natural place to
share it is next to the model: in its Hub repo or its local folder, under a prefixed file name that
cannot clash with the model's own files. Everything here accepts either a local path or a Hub repo
id, so ``Schedule.from_pretrained("org/model")`` and ``Schedule.from_pretrained("./model")`` read
the same way.

``huggingface_hub`` is imported inside the functions that talk to the Hub, never at import time:
``import stepcache`` stays light and works without it, and only reading from or writing to the Hub
asks for it (``pip install huggingface_hub``). Downloads go through ``hf_hub_download``, so its
cache, ``HF_HUB_OFFLINE`` and tokens behave as everywhere else in the Hugging Face ecosystem. Its
errors are turned into :class:`~stepcache.StepCacheError` subclasses that say what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ._io import CALIBRATION_FILE, SCHEDULE_FILE, JsonValue, as_path, dump, kind_of
from ._version import __version__
from .errors import ScheduleError, StepCacheError

if TYPE_CHECKING:
    from types import ModuleType

T = TypeVar("T", bound="HubValue")

__all__ = ["CALIBRATION_FILE", "SCHEDULE_FILE", "HubValue", "push_to_hub", "resolve_file", "save_pretrained"]


_MAX_LISTED = 20


def _hub(error: type[StepCacheError]) -> ModuleType:
    """``huggingface_hub``, imported on first use, or ``error`` saying how to install it."""
    try:
        import huggingface_hub
    except ImportError:
        raise error(
            "reading from or writing to the Hugging Face Hub needs huggingface_hub: "
            "pip install huggingface_hub (or pip install 'stepcache[hub]'). Local files and folders "
            "work without it."
        ) from None
    return huggingface_hub


def _env_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it again so setting it later counts.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _in_repo(filename: str, subfolder: str | None) -> str:
    return f"{subfolder.strip('/')}/{filename}" if subfolder and subfolder.strip("/") else filename


def _describe(repo_id: str, filename: str, subfolder: str | None, revision: str | None) -> str:
    return f"{_in_repo(filename, subfolder)!r} of Hub repo {repo_id!r} (revision {revision or 'main'!r})"


def _missing_in_folder(folder: Path, filename: str, subfolder: str | None) -> str:
    """Why ``folder/[subfolder/]filename`` is missing, and what the folder does hold."""
    wanted = folder / _in_repo(filename, subfolder)
    where = wanted.parent if wanted.parent.is_dir() else folder
    found = sorted(p.name for p in where.glob("*.json") if p.is_file())
    listed = ", ".join(found[:_MAX_LISTED]) + (
        f", ... ({len(found)} in all)" if len(found) > _MAX_LISTED else ""
    )
    msg = f"{wanted} does not exist. "
    if where != wanted.parent:
        msg += f"There is no folder {subfolder!r} in {folder}. "
    msg += f".json files in {where}: {listed or 'none'}."
    elsewhere = sorted(p.parent.relative_to(folder).as_posix() for p in folder.glob(f"*/{filename}"))
    if elsewhere:
        msg += f" {filename} is in subfolder {elsewhere[0]!r}: pass subfolder={elsewhere[0]!r}."
    else:
        msg += " Pass filename= to read another file, or write one with save_pretrained()."
    return msg


def resolve_file(
    repo_id_or_path: str | os.PathLike[str],
    filename: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    error: type[StepCacheError] = StepCacheError,
) -> Path:
    """The local path of ``filename`` in a file, a folder or a Hub repo.

    * a path to an existing file: that file (the other arguments are ignored);
    * an existing folder: ``folder/[subfolder/]filename`` (``revision``, ``cache_dir`` and ``token`` are
      ignored);
    * otherwise a Hub repo id (``"org/name"``): the file downloaded with ``hf_hub_download`` into the
      Hugging Face cache (or found there, when offline or with ``local_files_only=True``).

    Raises:
        error: the file cannot be found or fetched; the message names the repo, file and revision
            and says what to do. Never a raw ``huggingface_hub`` traceback.
    """
    if not isinstance(repo_id_or_path, (str, os.PathLike)):
        raise error(f"expected a file, a folder or a Hub repo id, got {type(repo_id_or_path).__name__}.")
    local = as_path(repo_id_or_path, "a file, folder or Hub repo id", error)
    if not isinstance(filename, str) or not filename or "\0" in filename:
        raise error(f"filename must be a non-empty file name without NUL bytes, got {kind_of(filename)}.")
    for label, value in (("subfolder", subfolder), ("revision", revision)):
        if value is not None and (not isinstance(value, str) or "\0" in value):
            raise error(f"{label} must be a string without NUL bytes (or None), got {kind_of(value)}.")
    if local.is_file():
        return local
    if local.exists() and not local.is_dir():  # a named pipe, a device: read_json says what it is
        return local
    if local.is_dir():
        path = local / _in_repo(filename, subfolder)
        if not path.is_file():
            raise error(_missing_in_folder(local, filename, subfolder))
        return path
    if not isinstance(repo_id_or_path, str):
        raise error(f"{local} is neither an existing file nor a folder.")
    return _download(
        repo_id_or_path, filename, subfolder, revision, cache_dir, token, local_files_only, error
    )


def _download(
    repo_id: str,
    filename: str,
    subfolder: str | None,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    token: str | bool | None,
    local_files_only: bool,
    error: type[StepCacheError],
) -> Path:
    hub = _hub(error)
    from huggingface_hub import constants
    from huggingface_hub import utils as hub_utils

    offline = local_files_only or constants.is_offline_mode() or _env_offline()
    what = _describe(repo_id, filename, subfolder, revision)
    not_local = f"(there is no local file or folder {repo_id!r} either)"
    try:
        return Path(
            hub.hf_hub_download(
                repo_id,
                filename,
                subfolder=subfolder,
                repo_type="model",
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=offline,
                library_name="stepcache",
                library_version=__version__,
            )
        )
    except hub_utils.HFValidationError as e:
        reason = str(e).replace(" Use `repo_type` argument if needed.", "")  # not ours to pass
        msg = f"{repo_id!r} is neither an existing file or folder nor a valid Hub repo id ('org/name'): {reason}"
    except hub_utils.LocalEntryNotFoundError:
        cache = cache_dir or constants.HF_HUB_CACHE
        if offline:
            reason = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
            msg = (
                f"{what} is not in the Hugging Face cache ({cache}) and the Hub cannot be asked "
                f"({reason}): run once online, or pass a local folder {not_local}."
            )
        else:
            msg = (
                f"cannot reach the Hugging Face Hub for {what}, and it is not in the cache ({cache}): "
                f"check the connection (or proxy), or pass a local folder {not_local}."
            )
    except hub_utils.GatedRepoError:
        msg = (
            f"Hub repo {repo_id!r} is gated: accept its conditions on huggingface.co and log in "
            "(hf auth login) or pass token=."
        )
    except hub_utils.RepositoryNotFoundError:
        msg = (
            f"Hub repo {repo_id!r} does not exist, or is private and no valid token was given {not_local}: "
            "check the id, log in (hf auth login) or pass token=."
        )
    except hub_utils.RevisionNotFoundError:
        msg = f"Hub repo {repo_id!r} has no revision {revision!r}: pass an existing branch, tag or commit."
    except hub_utils.EntryNotFoundError:
        msg = (
            f"{what} does not exist: the repo has no such file. Pass filename= or subfolder= if it is "
            "stored under another name, or upload one with push_to_hub()."
        )
    except hub_utils.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        msg = f"the Hugging Face Hub refused {what} (HTTP {status}): {_first_line(e)}"
    except Exception as e:  # connection, timeout, disk, the HTTP client's own errors (no common base)
        msg = f"cannot fetch {what}: {type(e).__name__}: {_first_line(e)}"
    raise error(msg)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no details"


def save_pretrained(
    value: JsonValue, save_directory: str | os.PathLike[str], filename: str | None = None
) -> Path:
    """Write ``value`` as ``save_directory/filename``, creating the folder; returns the file's path.

    ``filename`` defaults to :data:`SCHEDULE_FILE` or :data:`CALIBRATION_FILE`, so the file can sit in
    a model folder and be found again by ``from_pretrained(folder)``.
    """
    if not isinstance(value, JsonValue):
        raise StepCacheError(f"expected a Schedule or a Calibration, got {type(value).__name__}.")
    default, error = value._default_file, value._error
    folder = as_path(save_directory, "save_pretrained folder", error)
    if filename is not None and (not isinstance(filename, str) or not filename):
        raise error(f"filename must be a non-empty file name (or None), got {kind_of(filename)}.")
    if folder.exists() and not folder.is_dir():
        raise error(
            f"{folder} is a file; save_pretrained() needs a folder to write {filename or default} into."
        )
    return value.save(folder / (filename or default))


def push_to_hub(
    value: JsonValue,
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
    """Upload ``value`` as ``[subfolder/]filename`` of Hub model repo ``repo_id``; returns the commit URL.

    The repo is created if it does not exist (``private`` applies only then). Use it to publish a
    schedule in the model's own repo (or a repo of its own) so that others load it with
    ``from_pretrained(repo_id)``. ``create_pr=True`` opens a pull request instead of committing to
    ``revision`` (default: the main branch).
    """
    if not isinstance(value, JsonValue):
        raise StepCacheError(f"expected a Schedule or a Calibration, got {type(value).__name__}.")
    default, error = value._default_file, value._error
    hub = _hub(error)
    from huggingface_hub import utils as hub_utils

    path_in_repo = _in_repo(filename or default, subfolder)
    kind = "schedule" if error is ScheduleError else "calibration"
    api = hub.HfApi(token=token, library_name="stepcache", library_version=__version__)
    try:
        api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        info = api.upload_file(
            path_or_fileobj=dump(value.to_dict()).encode(),
            path_in_repo=path_in_repo,
            repo_id=repo_id,
            token=token,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload stepcache {kind} {path_in_repo}",
            create_pr=create_pr,
        )
    except hub_utils.HFValidationError as e:
        raise error(f"{repo_id!r} is not a valid Hub repo id ('org/name'): {e}") from None
    except hub_utils.LocalTokenNotFoundError:
        raise error(
            f"pushing to {repo_id!r} needs a Hugging Face token: log in (hf auth login) or pass token=."
        ) from None
    except hub_utils.RevisionNotFoundError:
        raise error(
            f"Hub repo {repo_id!r} has no branch {revision!r}: create it first, or leave revision= unset."
        ) from None
    except hub_utils.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = " Check that the token can write to it." if status in (401, 403) else ""
        raise error(
            f"the Hugging Face Hub refused to store {path_in_repo!r} in {repo_id!r} "
            f"(HTTP {status}): {_first_line(e)}.{hint}"
        ) from None
    except Exception as e:  # offline mode, connection, timeout, the HTTP client's own errors
        raise error(
            f"cannot push {path_in_repo!r} to {repo_id!r}: {type(e).__name__}: {_first_line(e)}"
        ) from None
    return str(getattr(info, "commit_url", info))


class HubValue(JsonValue):
    """A :class:`~stepcache._io.JsonValue` that also lives next to its model: ``from_pretrained`` /
    ``save_pretrained`` / ``push_to_hub`` read and write it in a file, a model folder or a Hub repo.
    A mixin below the values, so they get Hub support without this module importing them back."""

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
        the model lives (see :func:`resolve_file`)."""
        if filename is not None and (not isinstance(filename, str) or not filename):
            raise cls._error(f"filename must be a non-empty file name (or None), got {kind_of(filename)}.")
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
        return save_pretrained(self, save_directory, filename)

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
        return push_to_hub(
            self,
            repo_id,
            filename=filename,
            subfolder=subfolder,
            commit_message=commit_message,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
