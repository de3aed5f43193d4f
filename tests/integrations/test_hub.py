"""Schedules and calibrations in model folders and on the Hub, offline only.

Hub repos are read from a Hugging Face cache built on disk with ``HF_HUB_OFFLINE=1``; pushes go to a
fake ``HfApi``; Hub failures are raised by a fake ``hf_hub_download``. Nothing reaches the network.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import stepcache
from stepcache import Calibration, CalibrationError, Schedule, ScheduleError
from stepcache.integrations import hub
from stepcache.policies import fora

hf = pytest.importorskip("huggingface_hub")
from huggingface_hub import errors as hf_errors  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CAL_DICT = {
    "format": "stepcache.calibration",
    "num_steps": 3,
    "lookahead": 1,
    "num_samples": 1,
    "meta": {"model_class": "Tiny"},
    "components": {"blocks.0.attn": {"type": "attn", "errors": [[None], [0.1], [0.2]], "macs": 10.0}},
}


def small_schedule() -> Schedule:
    return fora(10, 2)


def small_calibration() -> Calibration:
    return Calibration.from_dict(CAL_DICT)


def unchained(e: BaseException) -> bool:
    """No huggingface_hub traceback would be printed above the error."""
    return e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)


def same(a, b) -> bool:
    return type(a) is type(b) and a.to_dict() == b.to_dict()


@pytest.fixture
def offline(monkeypatch):
    """Offline as a user sets it: the environment variable (read at each call by stepcache)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def hf_cache(tmp_path):
    """A Hugging Face cache holding ``org/name`` at COMMIT (branch main), as hf_hub_download leaves it."""
    cache = tmp_path / "hf-cache"
    repo = cache / "models--org--name"
    snap = repo / "snapshots" / COMMIT
    small_schedule().save(snap / hub.SCHEDULE_FILE)
    fora(10, 5).save(snap / "transformer" / hub.SCHEDULE_FILE)
    small_calibration().save(snap / hub.CALIBRATION_FILE)
    (snap / "broken").mkdir()
    (snap / "broken" / hub.SCHEDULE_FILE).write_text('{"format": "stepcache.schedule", "num_st')
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


# ---------------------------------------------------------------- local folders


def test_defaults_are_the_module_constants():
    assert hub.SCHEDULE_FILE == "stepcache_schedule.json"
    assert hub.CALIBRATION_FILE == "stepcache_calibration.json"
    for value, name in ((small_schedule(), hub.SCHEDULE_FILE), (small_calibration(), hub.CALIBRATION_FILE)):
        assert type(value)._default_file == name
        for method in (type(value).from_pretrained, value.save_pretrained, value.push_to_hub):
            assert inspect.signature(method).parameters["filename"].default is None  # = the class's file


@pytest.mark.parametrize("make", [small_schedule, small_calibration])
def test_save_and_load_in_a_folder(tmp_path, make):
    value = make()
    cls = type(value)
    path = value.save_pretrained(tmp_path / "new" / "folder")
    default = hub.SCHEDULE_FILE if cls is Schedule else hub.CALIBRATION_FILE
    assert path == tmp_path / "new" / "folder" / default and path.is_file()
    assert same(cls.from_pretrained(tmp_path / "new" / "folder"), value)
    assert same(cls.from_pretrained(str(path)), value)  # a file is read whatever its name
    value.save_pretrained(tmp_path, filename="other.json")
    assert same(cls.from_pretrained(tmp_path, "other.json"), value)


def test_next_to_a_model_folder_and_in_a_subfolder(tmp_path):
    model = tmp_path / "model"
    (model / "transformer").mkdir(parents=True)
    (model / "model_index.json").write_text('{"_class_name": "DiTPipeline"}')
    (model / "transformer" / "config.json").write_text("{}")
    sched, cal = small_schedule(), small_calibration()
    assert sched.save_pretrained(model) == model / hub.SCHEDULE_FILE
    cal.save_pretrained(model / "transformer")
    assert same(Schedule.from_pretrained(str(model)), sched)
    assert same(Calibration.from_pretrained(model, subfolder="transformer"), cal)
    assert json.loads((model / "model_index.json").read_text()) == {"_class_name": "DiTPipeline"}


def test_missing_file_in_a_folder_lists_what_is_there(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(ScheduleError) as e:
        Schedule.from_pretrained(tmp_path)
    msg = str(e.value)
    assert hub.SCHEDULE_FILE in msg and "model_index.json, notes.json" in msg and "filename=" in msg
    assert unchained(e.value)

    small_calibration().save_pretrained(tmp_path / "transformer")
    with pytest.raises(CalibrationError, match="pass subfolder='transformer'"):
        Calibration.from_pretrained(tmp_path)
    with pytest.raises(CalibrationError, match=r"no folder 'vae'.*model_index\.json"):
        Calibration.from_pretrained(tmp_path, subfolder="vae")


def test_corrupt_json_is_a_clear_error(tmp_path):
    (tmp_path / hub.SCHEDULE_FILE).write_text('{"format": ')
    (tmp_path / hub.CALIBRATION_FILE).write_text('{"format": "stepcache.calibration"}')
    with pytest.raises(ScheduleError, match="not valid JSON"):
        Schedule.from_pretrained(tmp_path)
    with pytest.raises(CalibrationError, match="missing or has malformed field"):
        Calibration.from_pretrained(tmp_path)


def test_a_missing_path_object_is_not_taken_for_a_repo_id(tmp_path):
    with pytest.raises(ScheduleError, match="neither an existing file nor a folder"):
        Schedule.from_pretrained(tmp_path / "nowhere")


def test_save_pretrained_into_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ScheduleError, match="is a file"):
        small_schedule().save_pretrained(tmp_path / "file")
    with pytest.raises(stepcache.StepCacheError, match="Schedule or a Calibration"):
        hub.save_pretrained({"plans": {}}, tmp_path)


# ---------------------------------------------------------------- Hub repos, from the cache


def test_repo_id_from_the_cache_offline(hf_cache, offline):
    assert same(Schedule.from_pretrained("org/name", cache_dir=hf_cache), small_schedule())
    assert same(Schedule.from_pretrained("org/name", cache_dir=hf_cache, revision=COMMIT), small_schedule())
    sub = Schedule.from_pretrained("org/name", subfolder="transformer", cache_dir=hf_cache, revision="main")
    assert same(sub, fora(10, 5))
    assert same(Calibration.from_pretrained("org/name", cache_dir=hf_cache), small_calibration())
    path = hub.resolve_file("org/name", hub.SCHEDULE_FILE, cache_dir=hf_cache)
    assert path == hf_cache / "models--org--name" / "snapshots" / COMMIT / hub.SCHEDULE_FILE


def test_local_files_only_reads_the_cache_without_the_env(hf_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    sched = Schedule.from_pretrained("org/name", cache_dir=hf_cache, local_files_only=True)
    assert same(sched, small_schedule())


def test_repo_not_in_the_cache_offline(hf_cache, offline):
    with pytest.raises(ScheduleError) as e:
        Schedule.from_pretrained("org/missing", cache_dir=hf_cache)
    msg = str(e.value)
    for part in ("'org/missing'", hub.SCHEDULE_FILE, "'main'", "HF_HUB_OFFLINE", "run once online"):
        assert part in msg
    assert unchained(e.value)
    with pytest.raises(CalibrationError, match=r"revision 'v2'.*not in the Hugging Face cache"):
        Calibration.from_pretrained("org/name", cache_dir=hf_cache, revision="v2")
    with pytest.raises(ScheduleError, match=r"'vae/stepcache_schedule.json' of Hub repo 'org/name'"):
        Schedule.from_pretrained("org/name", subfolder="vae", cache_dir=hf_cache)


def test_corrupt_file_in_the_cache(hf_cache, offline):
    with pytest.raises(ScheduleError, match="not valid JSON"):
        Schedule.from_pretrained("org/name", subfolder="broken", cache_dir=hf_cache)


@pytest.mark.parametrize("bad", ["org/name/extra", "bad--name", "has space!"])
def test_invalid_repo_id(bad, tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ScheduleError, match="nor a valid Hub repo id") as e:
        Schedule.from_pretrained(bad, cache_dir=tmp_path)
    assert repr(bad) in str(e.value)


# ---------------------------------------------------------------- Hub failures, translated


def http_error(cls: type[Exception], status: int) -> Exception:
    """An instance of a huggingface_hub HTTP error without building an HTTP response."""
    err = cls.__new__(cls)
    Exception.__init__(err, f"{status} Client Error\nmore lines")
    err.response = SimpleNamespace(status_code=status, headers={})
    return err


REMOTE_ENTRY = getattr(hf_errors, "RemoteEntryNotFoundError", hf_errors.EntryNotFoundError)


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (lambda: http_error(hf_errors.RepositoryNotFoundError, 401), "does not exist, or is private"),
        (lambda: http_error(hf_errors.GatedRepoError, 403), "is gated"),
        (lambda: http_error(hf_errors.RevisionNotFoundError, 404), "has no revision 'v9'"),
        (lambda: http_error(REMOTE_ENTRY, 404), "the repo has no such file"),
        (lambda: http_error(hf_errors.HfHubHTTPError, 500), r"refused .* \(HTTP 500\): 500 Client Error$"),
        (lambda: hf_errors.LocalEntryNotFoundError("no connection"), "cannot reach the Hugging Face Hub"),
        (lambda: ConnectionError("reset by peer"), "ConnectionError: reset by peer"),
    ],
)
def test_hub_errors_are_translated(monkeypatch, tmp_path, raised, expected):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the fake download stands in for the network
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw))
        raise raised()

    monkeypatch.setattr(hf, "hf_hub_download", fake_download)
    with pytest.raises(ScheduleError, match=expected) as e:
        Schedule.from_pretrained("org/name", revision="v9", token="t")
    assert unchained(e.value) and "Traceback" not in str(e.value)
    (repo_id, filename, kw) = calls[0]
    assert (repo_id, filename, kw["revision"], kw["token"], kw["repo_type"]) == (
        "org/name",
        hub.SCHEDULE_FILE,
        "v9",
        "t",
        "model",
    )


def test_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ScheduleError, match="pip install huggingface_hub"):
        Schedule.from_pretrained("org/name")
    with pytest.raises(CalibrationError, match="pip install huggingface_hub"):
        small_calibration().push_to_hub("org/name")
    small_schedule().save_pretrained(tmp_path)  # local folders need no huggingface_hub
    assert same(Schedule.from_pretrained(tmp_path), small_schedule())


@pytest.mark.slow
def test_import_stepcache_does_not_import_huggingface_hub():
    code = (
        "import sys, stepcache, stepcache.integrations.hub; "
        "assert 'huggingface_hub' not in sys.modules, 'huggingface_hub imported'"
    )
    src = str(Path(stepcache.__file__).parents[1])
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": src}, timeout=60
    )


# ---------------------------------------------------------------- push


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records calls, never touches the network."""

    calls: list[tuple[str, dict]]
    fail: Exception | None = None

    def __init__(self, **kwargs):
        FakeApi.calls.append(("init", kwargs))

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if FakeApi.fail is not None:
            raise FakeApi.fail

    def upload_file(self, **kwargs):
        FakeApi.calls.append(("upload_file", kwargs))
        return SimpleNamespace(commit_url=f"https://hub.invalid/{kwargs['repo_id']}/commit/{COMMIT}")


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls, FakeApi.fail = [], None
    monkeypatch.setattr(hf, "HfApi", FakeApi)
    return FakeApi


@pytest.mark.parametrize("make", [small_schedule, small_calibration])
def test_push_to_hub(fake_api, tmp_path, make):
    value = make()
    url = value.push_to_hub("me/model", subfolder="transformer", private=True, token="tok", create_pr=True)
    assert url == f"https://hub.invalid/me/model/commit/{COMMIT}"
    (_, init), (_, create), (_, upload) = fake_api.calls
    assert init["token"] == "tok"
    assert create == {
        "repo_id": "me/model",
        "token": "tok",
        "private": True,
        "repo_type": "model",
        "exist_ok": True,
    }
    default = hub.SCHEDULE_FILE if isinstance(value, Schedule) else hub.CALIBRATION_FILE
    assert upload["repo_id"] == "me/model" and upload["path_in_repo"] == f"transformer/{default}"
    assert upload["create_pr"] is True and upload["revision"] is None and upload["repo_type"] == "model"
    assert default in upload["commit_message"]
    (tmp_path / "up.json").write_bytes(upload["path_or_fileobj"])
    assert same(type(value).load(tmp_path / "up.json"), value)


def test_push_options_and_errors(fake_api):
    small_schedule().push_to_hub("me/model", filename="fast.json", commit_message="hi", revision="dev")
    upload = fake_api.calls[-1][1]
    assert (upload["path_in_repo"], upload["commit_message"], upload["revision"]) == (
        "fast.json",
        "hi",
        "dev",
    )
    fake_api.fail = http_error(hf_errors.HfHubHTTPError, 403)
    with pytest.raises(ScheduleError, match=r"refused .*HTTP 403.*token can write") as e:
        small_schedule().push_to_hub("me/model")
    assert unchained(e.value)
    fake_api.fail = hf_errors.LocalTokenNotFoundError("no token")
    with pytest.raises(CalibrationError, match="needs a Hugging Face token"):
        small_calibration().push_to_hub("me/model")


# ---------------------------------------------------------------- resolve_schedule


def test_resolve_schedule_takes_every_kind_of_spec(tmp_path, hf_cache, offline):
    sched = small_schedule()
    assert hub.resolve_schedule(sched) is sched
    any_name = sched.save(tmp_path / "mine.json")
    assert same(hub.resolve_schedule(any_name), sched)
    assert same(hub.resolve_schedule(str(any_name)), sched)
    sched.save_pretrained(tmp_path / "model")
    assert same(hub.resolve_schedule(tmp_path / "model"), sched)
    assert same(hub.resolve_schedule(str(tmp_path / "model")), sched)
    with pytest.raises(ScheduleError, match="got int"):
        hub.resolve_schedule(3)


def test_resolve_schedule_from_a_repo_id(tmp_path, hf_cache, monkeypatch, offline):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))  # the default cache_dir
    assert same(hub.resolve_schedule("org/name"), small_schedule())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ScheduleError, match=r"'org/name'.*not in the Hugging Face cache"):
        hub.resolve_schedule("org/name")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"filename": 123}, "filename"),
        ({"filename": ""}, "filename"),
        ({"filename": "a\0b.json"}, "NUL"),
        ({"subfolder": 123}, "subfolder"),
        ({"subfolder": ["x"]}, "subfolder"),
        ({"revision": 1.5}, "revision"),
    ],
)
def test_from_pretrained_arguments_of_the_wrong_type_are_clear_errors(tmp_path, kwargs, match):
    """from_pretrained(filename=123) raised a raw TypeError, subfolder=123 an AttributeError (issue 24)."""
    small_schedule().save_pretrained(tmp_path)
    with pytest.raises(ScheduleError, match=match):
        Schedule.from_pretrained(tmp_path, **kwargs)


def test_a_nul_byte_in_a_path_or_repo_id_is_a_clear_error(tmp_path):
    for value in (str(tmp_path) + "\0x", "org/na\0me"):
        with pytest.raises(ScheduleError, match="NUL"):
            Schedule.from_pretrained(value)
        with pytest.raises(CalibrationError, match="NUL"):
            Calibration.from_pretrained(value)
    with pytest.raises(ScheduleError, match="NUL"):
        small_schedule().save_pretrained(str(tmp_path) + "\0x")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_from_pretrained_on_a_named_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ScheduleError, match="named pipe, not a regular file"):
        Schedule.from_pretrained(fifo)
