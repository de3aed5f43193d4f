"""Files: atomic writes (a failed write leaves the old file, byte for byte), output path checks, and
strict JSON parsing (every malformed file is a StepCacheError naming what is wrong)."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import stepcache
from stepcache import Calibration, CalibrationError, Schedule, ScheduleError, StepCacheError, _io
from stepcache._io import MAX_DEPTH, atomic_write, check_output, parse_json

SRC = str(Path(stepcache.__file__).resolve().parents[1])  # the stepcache under test, for subprocesses


def schedule(n: int = 6) -> Schedule:
    return Schedule(n, {"attn": (1,) + (0, 1) * ((n - 1) // 2) + (1,) * ((n - 1) % 2)}, {"attn": 2})


def calibration() -> Calibration:
    import numpy as np

    errors = np.array([[np.nan, np.nan], [0.1, np.nan], [0.2, 0.3]])
    return Calibration(3, 2, 1, {"b.0.attn": "attn"}, {"b.0.attn": errors}, macs={"b.0.attn": 10.0})


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------- atomic writes
def test_save_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "s.json"
    schedule(4).save(path)
    schedule(6).save(path)
    assert Schedule.load(path) == schedule(6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


@pytest.mark.parametrize("make", [schedule, calibration], ids=["schedule", "calibration"])
def test_a_failed_write_keeps_the_old_file_byte_for_byte(tmp_path, monkeypatch, make):
    """Disk full at the end of the write (fsync): the old file is untouched, no temporary file stays."""
    path = tmp_path / "value.json"
    path.write_bytes(b"old contents \x00\xff")
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    value = make()
    with pytest.raises(type(value)._error, match=r"No space left on device.*previous file is unchanged"):
        value.save(path)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_an_exception_half_way_through_keeps_the_old_file(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old image")

    def half(fh):
        fh.write(b"new ima")
        raise RuntimeError("renderer crashed")

    with pytest.raises(RuntimeError, match="renderer crashed"):
        atomic_write(path, half)
    assert path.read_bytes() == b"old image"
    assert leftovers(tmp_path) == []


@pytest.mark.slow  # a fresh interpreter: ~2 s
@pytest.mark.skipif(sys.platform == "win32", reason="needs RLIMIT_FSIZE")
def test_file_size_limit_in_a_real_process_keeps_the_old_file(tmp_path):
    """A real EFBIG from the kernel (RLIMIT_FSIZE, as a quota would) while saving over a file."""
    path = tmp_path / "s.json"
    schedule(4).save(path)
    before = path.read_bytes()
    script = textwrap.dedent(
        f"""
        import resource, signal
        from stepcache import Schedule, ScheduleError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        big = Schedule(200, {{"attn": (1,) * 200, "ff": (1,) * 200}})
        try:
            big.save({str(path)!r})
        except ScheduleError as e:
            print("refused:", e)
        """
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout and "previous file is unchanged" in done.stdout
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_a_symlink_keeps_pointing_at_its_target_and_modes_are_kept(tmp_path):
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    schedule(4).save(real)
    real.chmod(0o640)
    link.symlink_to(real)
    schedule(6).save(link)
    assert link.is_symlink() and Schedule.load(real) == schedule(6)
    assert real.stat().st_mode & 0o777 == 0o640
    fresh = schedule(4).save(tmp_path / "fresh.json")
    mask = os.umask(0)
    os.umask(mask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() would, not mkstemp's 0600


def test_smoothcache_export_and_plots_are_atomic_too(tmp_path, monkeypatch):
    path = tmp_path / "orig.json"
    path.write_text("keep")

    def over_quota(fd):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(os, "fsync", over_quota)
    with pytest.raises(ScheduleError, match="Disk quota"):
        schedule(4).to_smoothcache(path)
    assert path.read_text() == "keep"
    plot = tmp_path / "c.png"
    plot.write_text("keep")
    with pytest.raises(StepCacheError, match="Disk quota"):
        calibration().plot(plot)
    assert plot.read_text() == "keep" and leftovers(tmp_path) == []


# ---------------------------------------------------------------- output paths
def test_output_paths_are_checked_before_writing(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(StepCacheError, match="is a folder: give a file name"):
        check_output(tmp_path / "dir", "schedule file")
    with pytest.raises(StepCacheError, match="is a file, not a folder"):
        check_output(tmp_path / "file" / "sub" / "s.json", "schedule file")
    with pytest.raises(StepCacheError, match="is a file, not a folder"):
        check_output(tmp_path / "file", "demo folder", folder=True)
    check_output(tmp_path / "new" / "deeper" / "s.json", "schedule file")  # to be created: fine
    assert not (tmp_path / "new").exists()  # checking writes nothing
    with pytest.raises(ScheduleError, match="is a folder"):
        schedule().save(tmp_path / "dir")
    with pytest.raises(ScheduleError, match="is a file, not a folder"):
        schedule().save(tmp_path / "file" / "s.json")
    with pytest.raises(StepCacheError, match="not an image format"):
        calibration().plot(tmp_path / "c.json")


def test_an_unwritable_folder_is_refused(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    with pytest.raises(StepCacheError, match="no permission to write in"):
        check_output(locked / "s.json", "schedule file")
    with pytest.raises(ScheduleError, match="no permission"):
        schedule().save(locked / "sub" / "s.json")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_folder_for_real(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ScheduleError, match="no permission"):
            schedule().save(locked / "s.json")
    finally:
        locked.chmod(0o700)


def test_meta_json_cannot_store_is_an_error_before_any_write(tmp_path):
    path = tmp_path / "s.json"
    path.write_text("keep")
    bad = Schedule(2, {"attn": (1, 1)}, meta={"note": float("nan")})
    with pytest.raises(ScheduleError, match="cannot write"):
        bad.save(path)
    assert path.read_text() == "keep"


# ---------------------------------------------------------------- strict parsing
@pytest.mark.parametrize(
    "raw, match",
    [
        (b'{"a": "\xff\xfe"}', "not UTF-8"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b'{"a": Infinity}', "Infinity is not a JSON number"),
        (b'{"a": [-Infinity]}', "-Infinity is not a JSON number"),
        (b'{"a": 1e999}', "out of range"),
        (b'{"a": ' + b"9" * 5000 + b"}", "too large"),
        (b'{"a": -' + b"1" * 31 + b"}", "too large"),
        (b"[" * 100_000 + b"]" * 100_000, "too deeply|more than"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), f"more than {MAX_DEPTH} deep"),
        (b'{"a": 1, "a": 2}', "appears twice"),
        (b"", "not valid JSON"),
        (b'{"a": 1', "not valid JSON"),
    ],
)
def test_malformed_json_is_a_clear_error(raw, match):
    with pytest.raises(CalibrationError, match=match):
        parse_json(raw, "f.json", "calibration", CalibrationError)


def test_a_byte_order_mark_and_large_but_sane_numbers_are_fine():
    assert parse_json(
        b'\xef\xbb\xbf{"a": [1e300, 123456789012345678901234567890]}', "f", "x", ScheduleError
    ) == {"a": [1e300, 123456789012345678901234567890]}


@pytest.mark.parametrize("raw", [b"\xff", b'{"format": NaN}', b"[" * 50_000])
def test_loaders_raise_their_own_error_for_bad_bytes(tmp_path, raw):
    path = tmp_path / "f.json"
    path.write_bytes(raw)
    with pytest.raises(ScheduleError):
        Schedule.load(path)
    with pytest.raises(CalibrationError):
        Calibration.load(path)
    with pytest.raises(ScheduleError):
        Schedule.from_smoothcache(path)
    with pytest.raises(ScheduleError, match="cannot read"):
        Schedule.load(tmp_path)  # a folder


# ---------------------------------------------------------------- special files, names, sizes (issue 24)
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")


def read_fifo_in_background(path: Path) -> tuple[threading.Thread, dict]:
    got: dict = {}

    def reader() -> None:
        with open(path, "rb") as fh:
            got["data"] = fh.read()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    return thread, got


@needs_fifo
@pytest.mark.parametrize("through_link", [False, True], ids=["fifo", "link-to-fifo"])
def test_saving_onto_a_named_pipe_writes_into_it_and_keeps_it(tmp_path, through_link):
    """os.replace would swap the pipe itself for a regular file; the data goes into the pipe instead."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    target = fifo
    if through_link:
        target = tmp_path / "link.json"
        target.symlink_to(fifo)
    thread, got = read_fifo_in_background(fifo)
    schedule(4).save(target)
    thread.join(10)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still the pipe, not a regular file
    assert Schedule.from_dict(json.loads(got["data"])) == schedule(4)
    assert leftovers(tmp_path) == []
    if through_link:
        assert target.is_symlink()


@needs_fifo
def test_a_named_pipe_nobody_reads_is_refused_without_hanging(tmp_path, monkeypatch):
    monkeypatch.setattr(_io, "FIFO_WAIT", 0.1)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ScheduleError, match="no process is reading"):
        schedule(4).save(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and leftovers(tmp_path) == []


def test_a_symlink_to_a_regular_file_is_still_replaced_atomically(tmp_path, monkeypatch):
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("keep")
    link.symlink_to(real)
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append(b), real_replace(a, b)))
    schedule(4).save(link)
    assert replaced == [real] and link.is_symlink() and Schedule.load(real) == schedule(4)


def test_a_special_file_that_cannot_take_a_file_is_refused(tmp_path, monkeypatch):
    """A block device or a socket: refused before anything is written (never replaced)."""
    import socket

    path = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
        with pytest.raises(ScheduleError, match="socket"):
            schedule(4).save(path)
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    finally:
        server.close()


@needs_fifo
def test_loading_from_a_named_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for load in (Schedule.load, Calibration.load, Schedule.from_smoothcache):
        with pytest.raises(StepCacheError, match="not a regular file"):
            load(fifo)


def test_a_huge_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "huge.json"
    path.write_text("[" + "0," * 1000 + "0]")
    monkeypatch.setattr(_io, "MAX_FILE_BYTES", 1000)
    real_read, read = os.read, []
    monkeypatch.setattr(os, "read", lambda fd, n: read.append(n) or real_read(fd, n))
    with pytest.raises(ScheduleError, match="larger than"):
        Schedule.load(path)
    assert read == []  # refused from its size, not after reading it


def test_running_out_of_memory_while_parsing_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    schedule(4).save(path)

    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(json, "loads", no_memory)
    with pytest.raises(ScheduleError, match="memory"):
        Schedule.load(path)


def test_over_long_names_are_refused_before_any_work(tmp_path):
    with pytest.raises(StepCacheError, match="too long"):
        check_output(tmp_path / ("a" * 300 + ".json"), "schedule file")
    with pytest.raises(StepCacheError, match="too long"):
        check_output(tmp_path / ("a/" * 3000 + "s.json"), "schedule file")
    # a name that fits leaves room for the hidden temporary file next to it
    longest = tmp_path / ("a" * 250 + ".json")
    schedule(4).save(longest)
    assert Schedule.load(longest) == schedule(4) and leftovers(tmp_path) == []


@pytest.mark.parametrize("path", ["a\0b.json", b"s.json", 123, None])
def test_paths_that_are_not_paths_are_clear_errors(tmp_path, path):
    with pytest.raises(StepCacheError):
        schedule(4).save(path if not isinstance(path, str) else tmp_path / path)
    with pytest.raises(StepCacheError):
        Schedule.load(path if not isinstance(path, str) else tmp_path / path)
    with pytest.raises(StepCacheError):
        Calibration.load(path if not isinstance(path, str) else str(tmp_path / path))
