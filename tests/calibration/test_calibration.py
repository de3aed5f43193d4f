"""Calibration: what is recorded, averaging over generations, files, errors."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import pytest
import torch

import stepcache
from stepcache import Calibration, CalibrationError
from tests._helpers.plain_models import sample

N = 8


def run_for(model, seeds):
    return lambda: [sample(model, torch.tensor([1, 2]), N, seed=s) for s in seeds]


def test_records_every_component_and_step(plain_dit):
    cal = stepcache.calibrate(plain_dit, run_for(plain_dit, [0]), lookahead=3, progress=False)
    assert cal.num_steps == N and cal.lookahead == 3 and cal.num_samples == 1
    assert list(cal.components) == [f"blocks.{i}.{c}" for i in range(3) for c in ("attn", "mlp")]
    table = cal.errors["blocks.0.attn"]
    assert table.shape == (N, 3)
    assert np.isnan(table[0]).all() and np.isnan(table[1, 1:]).all() and np.isfinite(table[3:]).all()
    assert (table[np.isfinite(table)] > 0).all()
    assert all(m and m > 0 for m in cal.macs.values())


def test_errors_are_relative_l1_per_item(plain_dit):
    """Recompute e(s, 1) of one component by hand from its recorded outputs."""
    outs = []
    hook = plain_dit.blocks[1].mlp.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    cal = stepcache.calibrate(plain_dit, run_for(plain_dit, [0]), lookahead=2, progress=False)
    hook.remove()
    for s in range(1, N):
        cur, prev = outs[s].flatten(1), outs[s - 1].flatten(1)
        want = ((cur - prev).abs().sum(1) / cur.abs().sum(1)).mean().item()
        assert cal.errors["blocks.1.mlp"][s, 0] == pytest.approx(want, rel=1e-5)


def test_three_generations_average_three_samples(plain_dit):
    singles = [stepcache.calibrate(plain_dit, run_for(plain_dit, [s]), progress=False) for s in (0, 1, 2)]
    together = stepcache.calibrate(plain_dit, run_for(plain_dit, [0, 1, 2]), progress=False)
    assert together.num_samples == 3
    for name in together.components:
        want = np.mean(np.stack([c.errors[name] for c in singles]), axis=0)  # NaN where undefined in all
        np.testing.assert_allclose(together.errors[name], want, rtol=1e-6, equal_nan=True)
    assert not np.allclose(singles[0].errors["blocks.0.attn"][3:], singles[1].errors["blocks.0.attn"][3:])


def test_pipeline_inputs_and_metadata(tiny_pipe):
    cal = stepcache.calibrate(
        tiny_pipe,
        inputs=[{"class_labels": [i], "generator": torch.Generator().manual_seed(i)} for i in range(2)],
        num_inference_steps=N,
        progress=False,
    )
    assert cal.num_samples == 2 and cal.num_steps == N
    assert cal.meta["model_class"] == "DiTTransformer2DModel" and cal.meta["scheduler"] == "DDIMScheduler"
    assert cal.meta["fingerprint"] and cal.meta["stepcache_version"]
    assert set(cal.type_errors()) == {"attn", "ff"}
    assert "attn" in cal.summary()


def test_save_load_round_trip(plain_dit, tmp_path):
    cal = stepcache.calibrate(plain_dit, run_for(plain_dit, [0, 1]), progress=False)
    path = cal.save(tmp_path / "cal.json")
    back = Calibration.load(path)
    assert back.to_dict() == cal.to_dict()
    assert back.num_samples == 2 and back.meta == cal.meta
    for name in cal.components:
        np.testing.assert_array_equal(back.errors[name], cal.errors[name])  # exact
    assert stepcache.from_calibration(back, 0.2) == stepcache.from_calibration(cal, 0.2)


def test_plot_writes_png(plain_dit, tmp_path):
    cal = stepcache.calibrate(plain_dit, run_for(plain_dit, [0]), progress=False)
    path = cal.plot(tmp_path / "c.png", schedule=stepcache.from_calibration(cal, 0.3))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "text, match",
    [
        ("{", "not valid JSON"),
        ('{"format": "x"}', "not a stepcache calibration"),
        ('{"format": "stepcache.calibration", "num_steps": 3}', "malformed field 'components'"),
    ],
)
def test_corrupt_calibration_files(tmp_path, text, match):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(CalibrationError, match=match):
        Calibration.load(path)


def test_calibration_from_a_different_model(plain_dit, tiny_pipe):
    cal = stepcache.calibrate(plain_dit, run_for(plain_dit, [0]), progress=False)
    cal.check_model(plain_dit)
    with pytest.raises(CalibrationError, match="recalibrate"):
        cal.check_model(tiny_pipe)


def test_bad_arguments(plain_dit, tiny_pipe):
    with pytest.raises(CalibrationError, match="lookahead"):
        stepcache.calibrate(plain_dit, run_for(plain_dit, [0]), lookahead=0)
    with pytest.raises(CalibrationError, match="run="):
        stepcache.calibrate(plain_dit)
    with pytest.raises(CalibrationError, match="no denoising step"):
        stepcache.calibrate(plain_dit, lambda: None, progress=False)
    with pytest.raises(CalibrationError, match="different step counts"):
        stepcache.calibrate(
            plain_dit, lambda: [sample(plain_dit, torch.tensor([0]), n) for n in (6, 8)], progress=False
        )


def test_model_is_untouched_after_calibration(plain_dit):
    before = [(n, sorted(m.__dict__), len(m._forward_hooks)) for n, m in plain_dit.named_modules()]
    with pytest.raises(RuntimeError):
        stepcache.calibrate(
            plain_dit, lambda: sample(plain_dit, torch.tensor([0]), N, fail_at=3), progress=False
        )
    assert [(n, sorted(m.__dict__), len(m._forward_hooks)) for n, m in plain_dit.named_modules()] == before


def test_merge_equals_calibrating_everything_at_once(plain_dit):
    parts = [
        stepcache.calibrate(plain_dit, run_for(plain_dit, seeds), progress=False) for seeds in ([0, 1], [2])
    ]
    together = stepcache.calibrate(plain_dit, run_for(plain_dit, [0, 1, 2]), progress=False)
    merged = Calibration.merge(parts)
    assert merged.num_samples == 3 and merged.meta["merged_from"] == 2
    for table in ("errors", "spread", "forecast_errors"):
        for name in together.components:
            got, want = getattr(merged, table)[name], getattr(together, table)[name]
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=table)


def test_merge_reads_files_of_any_version():
    """The shipped calibrations predate merging: a file's num_samples, mean and spread are its
    sufficient statistics. Merged with itself, the mean and the (population) spread stay."""
    with pytest.raises(CalibrationError, match="sensitivity weights"):  # the shipped file has them
        Calibration.merge([files("stepcache.reference") / "calibrations" / "ddim-50.json"] * 2)
    path = files("stepcache.reference") / "calibrations" / "ddim-50.json"
    cal = Calibration.load(str(path)).replace(weights={})  # sensitivity weights do not pool
    # the same file twice is refused (its generations would count twice); one more sample is not it
    more = cal.replace(num_samples=cal.num_samples + 1)
    twice = Calibration.merge([cal, more])
    assert twice.num_samples == 2 * cal.num_samples + 1
    for name in cal.components:
        np.testing.assert_allclose(twice.errors[name], cal.errors[name], rtol=1e-12, equal_nan=True)
        np.testing.assert_allclose(
            twice.spread[name], cal.spread[name], rtol=1e-6, atol=1e-12, equal_nan=True
        )


def test_merge_refuses_what_does_not_pool(plain_dit):
    cal = stepcache.calibrate(plain_dit, run_for(plain_dit, [0]), lookahead=2, progress=False)
    with pytest.raises(CalibrationError, match="at least one"):
        Calibration.merge([])
    with pytest.raises(CalibrationError, match="differs from calibration 0 in lookahead"):
        Calibration.merge(
            [cal, stepcache.calibrate(plain_dit, run_for(plain_dit, [1]), lookahead=3, progress=False)]
        )
    with pytest.raises(CalibrationError, match="forecast errors recorded"):
        Calibration.merge([cal, cal.replace(forecast_errors={})])
    with pytest.raises(CalibrationError, match="fingerprint"):
        Calibration.merge([cal, cal.replace(meta={**cal.meta, "fingerprint": "other"})])
    weights = {name: np.ones(cal.num_steps) for name in cal.components}
    with pytest.raises(CalibrationError, match="sensitivity weights"):
        Calibration.merge([cal, cal.replace(weights=weights)])
    other = stepcache.calibrate(plain_dit, run_for(plain_dit, [1]), lookahead=2, progress=False)
    no_spread = Calibration.merge([cal, other.replace(spread={})])
    assert not no_spread.spread and no_spread.num_samples == 2


def test_merge_takes_calibrations_only_and_names_what_else_it_got(plain_dit, tmp_path):
    """Calibration.merge([cal, schedule]) raised a raw TypeError (issue 24)."""
    cal = stepcache.calibrate(plain_dit, run_for(plain_dit, [0]), lookahead=2, progress=False)
    for other in (stepcache.fora(N, 2), 3, None, b"cal.json", "a\0b.json"):
        with pytest.raises(CalibrationError, match="calibration 1"):
            Calibration.merge([cal, other])
    with pytest.raises(CalibrationError, match="takes a list"):
        Calibration.merge(cal)  # one calibration, not a list of them


def test_merge_refuses_the_same_generations_twice_and_conflicting_sizes(plain_dit, tmp_path):
    """Merging one file twice doubled its samples silently; conflicting output sizes were kept from the
    first file without notice (issue 24)."""
    cal = stepcache.calibrate(plain_dit, run_for(plain_dit, [0]), lookahead=2, progress=False)
    other = stepcache.calibrate(plain_dit, run_for(plain_dit, [1]), lookahead=2, progress=False)
    path = cal.save(tmp_path / "a.json")
    for twice in ([cal, cal], [path, path], [cal, path], [path, other, str(path)]):
        with pytest.raises(CalibrationError, match="same generations twice"):
            Calibration.merge(twice)
    sizes = {name: 4096 for name in cal.components}
    a = cal.replace(meta={**cal.meta, "output_bytes": sizes})
    b = other.replace(meta={**other.meta, "output_bytes": {**sizes, next(iter(sizes)): 8192}})
    with pytest.raises(CalibrationError, match="output_bytes"):
        Calibration.merge([a, b])
    merged = Calibration.merge([cal, other.replace(meta={**other.meta, "output_bytes": sizes})])
    assert merged.meta["output_bytes"] == sizes  # recorded by one input only: kept
    assert Calibration.merge([a, other.replace(meta={**other.meta, "output_bytes": sizes})]).num_samples == 2
