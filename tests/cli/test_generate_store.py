"""`stepcache generate` (the one line on the command line) and `stepcache store list | show | remove |
export`, with STEPCACHE_HOME in a temporary folder; bad input is one line on stderr, exit code 2."""

from __future__ import annotations

import pytest
from PIL import Image
from typer.testing import CliRunner

import stepcache.cli as cli
from stepcache import Calibration
from stepcache.store import Store

runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    folder = tmp_path / "home"
    monkeypatch.setenv("STEPCACHE_HOME", str(folder))
    return folder


def run(*args: str):
    return runner.invoke(cli.app, list(args))


def one_line_error(result, expect: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    err = result.stderr
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in result.output, err
    assert expect.lower() in err.lower(), err


def test_generate_calibrates_then_caches_and_compares(home, tmp_path):
    out = tmp_path / "out.png"
    first = run("generate", "tiny-dit", "--steps", "4", "--compare", "-o", str(out))
    assert first.exit_code == 0, first.output
    assert "calibration run 1: uncached and recorded" in first.stdout
    assert "cached DiTTransformer2DModel, DDIMScheduler, 4 steps" in first.stdout
    assert "speed-up" in first.stdout and "PSNR" in first.stdout
    with Image.open(out) as image, Image.open(tmp_path / "out-compare.png") as side:
        assert side.size == (3 * image.size[0] + 4, image.size[1]) and image.size[0] >= 128
    assert len(Store().entries()) == 1
    again = run("generate", "tiny-dit", "--steps", "4", "-o", str(out))  # stored: cached at once
    assert again.exit_code == 0 and "calibration run" not in again.stdout
    assert "with the stored calibration" in again.stdout


def test_generate_checks_its_arguments_before_any_work(home, tmp_path, monkeypatch):
    def no_work(*args, **kw):
        raise AssertionError("work started although the arguments were bad")

    monkeypatch.setattr(cli.generate._targets, "load_target", no_work)
    one_line_error(run("generate", "tiny-dit", "-o", str(tmp_path / "out.txt")), "image file name")
    (tmp_path / "dir.png").mkdir()
    one_line_error(run("generate", "tiny-dit", "-o", str(tmp_path / "dir.png")), "is a folder")
    one_line_error(run("generate", "tiny-dit", "--compute-fraction", "0"), "compute fraction must be")
    one_line_error(run("generate", "tiny-dit", "--scheduler", "flow-euler"), "fits only")
    one_line_error(run("generate", "reference", "--model", "flow", "--scheduler", "ddim"), "does not fit")


def test_store_commands(home, tmp_path):
    empty = run("store", "list")
    assert empty.exit_code == 0 and "no calibrations stored" in empty.stdout
    assert run("generate", "reference", "--steps", "4", "-o", str(tmp_path / "a.png")).exit_code == 0
    listed = run("store", "list")
    (entry,) = Store().entries()
    assert listed.exit_code == 0 and entry.id in listed.stdout and "4 steps" in listed.stdout
    shown = run("store", "show", entry.id[:6])
    assert shown.exit_code == 0 and '"steps": 4' in shown.stdout and "Calibration:" in shown.stdout
    exported = run("store", "export", entry.id, str(tmp_path / "shared"), "--compute-fraction", "0.5")
    assert exported.exit_code == 0, exported.output
    assert Calibration.from_pretrained(tmp_path / "shared").num_steps == 4
    assert (tmp_path / "shared" / "stepcache_schedule.json").is_file()
    # Bad entries and bad arguments: one line each.
    (home / "calibrations" / "0000aaaa0000aaaa.json").write_text('{"format": "stepcache.calibration"')
    assert "REFUSED" in run("store", "list").stdout
    one_line_error(run("store", "show", "0000aaaa"), "is refused")
    one_line_error(run("store", "export", "0000aaaa", str(tmp_path / "x")), "is refused")
    one_line_error(run("store", "show", "zz"), "not an entry id")
    one_line_error(run("store", "show", "ffffffff"), "no stored calibration")
    one_line_error(run("store", "export", entry.id, str(tmp_path / "a.png")), "is a file")
    one_line_error(run("store", "remove"), "give one entry id, or --all")
    one_line_error(run("store", "remove", entry.id, "--all"), "give one entry id, or --all")
    removed = run("store", "remove", entry.id)
    assert removed.exit_code == 0 and entry.id in removed.stdout
    assert run("store", "remove", "--all").exit_code == 0
    assert Store().entries() == []
