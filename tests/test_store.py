"""The calibration store ($STEPCACHE_HOME): atomic, locked writes that keep the first valid entry of a
key, refused corrupt entries, and the lookups behind `stepcache store`."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import stepcache
from stepcache import Calibration, StepCacheWarning
from stepcache.errors import StoreError
from stepcache.store import Store, describe, home, key_id

SHIPPED = Path(stepcache.__file__).parent / "reference" / "calibrations" / "dpm-20.json"
KEY = {
    "model_class": "DiTTransformer2DModel",
    "fingerprint": "0123456789abcdef",
    "weights_digest": "fedcba9876543210",
    "dtype": "float32",
    "adapters": [],
    "components": "00ff00ff00ff00ff",
    "scheduler": "DPMSolverMultistepScheduler",
    "scheduler_config": "abababababababab",
    "steps": 20,
    "guidance": 1.0,
    "latent_shape": [1, 16, 16],
}


@pytest.fixture
def cal():
    return Calibration.load(SHIPPED)


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "home")


def test_home_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPCACHE_HOME", str(tmp_path / "x"))
    assert home() == tmp_path / "x" and Store().folder == tmp_path / "x" / "calibrations"
    monkeypatch.delenv("STEPCACHE_HOME")
    assert home() == Path("~/.cache/stepcache").expanduser()


def test_put_get_and_keep_the_first_entry(store, cal):
    assert store.get(KEY) is None and store.entries() == []
    stored = store.put(KEY, cal)
    assert stored.meta["store"] == {"id": key_id(KEY), "key": KEY}
    assert store.path(KEY).name == f"{key_id(KEY)}.json"
    assert store.get(KEY).to_dict() == stored.to_dict()
    other = cal.replace(num_samples=cal.num_samples + 1)
    assert store.put(KEY, other).num_samples == cal.num_samples  # another process was first: kept
    assert store.get({**KEY, "steps": 25}) is None
    (entry,) = store.entries()
    assert entry.problem is None and entry.description == describe(KEY)
    assert "20 steps" in entry.description and "latent 1x16x16" in entry.description


def test_writers_at_once_leave_one_valid_entry(store, cal):
    variants = [cal.replace(num_samples=n) for n in range(1, 9)]
    results: list[Calibration] = []
    threads = [threading.Thread(target=lambda c=c: results.append(store.put(KEY, c))) for c in variants]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.num_samples for r in results}) == 1  # every writer got the one that was kept
    assert [p.name for p in store.folder.iterdir()] == [f"{key_id(KEY)}.json"]
    assert store.get(KEY).num_samples == results[0].num_samples


def test_corrupt_and_mismatched_entries_are_refused(store, cal):
    path = store.path(KEY)
    store.put(KEY, cal)
    text = path.read_text()
    path.write_text(text[: len(text) // 3])
    with pytest.warns(StepCacheWarning, match="refusing the stored calibration .* cannot be read"):
        assert store.get(KEY) is None
    (entry,) = store.entries()
    assert entry.problem.startswith("it cannot be read") and entry.description == "(unreadable)"
    assert store.put(KEY, cal).num_samples == cal.num_samples  # a refused entry is replaced
    assert store.get(KEY) is not None
    # A valid calibration filed under another key's id.
    other = {**KEY, "steps": 25}
    store.path(other).write_text(path.read_text())
    with pytest.warns(StepCacheWarning, match="its key has id"):
        assert store.get(other) is None
    # A calibration with no store key at all.
    cal.save(store.path(other))
    with pytest.warns(StepCacheWarning, match="records no store key"):
        assert store.get(other) is None


def test_find_remove_and_export(store, cal, tmp_path):
    store.put(KEY, cal)
    ident = key_id(KEY)
    assert store.find(ident[:4]).id == ident == store.find(f"{ident}.json").id
    for ref, match in (
        ("zz", "is not an entry id"),
        ("abc", "is not an entry id"),
        ("0000000000", "no stored calibration"),
    ):
        with pytest.raises(StoreError, match=match):
            store.find(ref)
    twin = store.folder / f"{ident[:4]}000000000000.json"  # an entry whose id shares 4 digits
    twin.write_text("{}")
    with pytest.raises(StoreError, match="matches 2 entries"):
        store.find(ident[:4])
    twin.unlink()
    second = {**KEY, "steps": 25}
    store.put(second, cal)
    out = store.export(ident, tmp_path / "shared")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "stepcache_calibration.json"]
    assert Calibration.from_pretrained(out).meta["store"]["key"] == KEY
    readme = (out / "README.md").read_text()
    assert ident in readme and '"steps": 20' in readme and "library_name: stepcache" in readme
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(StoreError, match="is a file, not a folder"):
        store.export(ident, tmp_path / "a-file")
    assert store.remove(ident).id == ident
    assert [e.id for e in store.entries()] == [key_id(second)]
    with pytest.raises(StoreError, match="no stored calibration"):
        store.remove(ident)


def test_an_unwritable_store_is_a_clear_error(tmp_path, cal):
    (tmp_path / "home").write_text("not a folder")
    with pytest.raises(StoreError, match="cannot create the store's folder"):
        Store(tmp_path / "home").put(KEY, cal)
    with pytest.raises(StoreError, match="keeps calibrations"):
        Store(tmp_path / "ok").put(KEY, json.loads(SHIPPED.read_text()))
