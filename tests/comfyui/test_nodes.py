"""The nodes as ComfyUI loads and runs them: the custom node folder through ComfyUI's own loader, each node
through ComfyUI's execution of one node (its V3 class checks and locked clone), and the example workflow."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from tests.comfyui import _tiny
from tests.comfyui.conftest import ROOT

NODE_FOLDER = ROOT / "comfyui-stepcache"
NODE_IDS = {"StepCache": "StepCache", "StepCacheScheduleFile": "StepCache (schedule file)"}
NODE_IDS["StepCacheCalibrate"] = "StepCache Calibrate"


@pytest.fixture(scope="module")
def registry():
    """ComfyUI's node registry with the custom node folder loaded by ComfyUI's loader (removed after)."""
    import nodes

    before = set(nodes.NODE_CLASS_MAPPINGS)
    assert asyncio.run(nodes.load_custom_node(str(NODE_FOLDER)))
    yield nodes.NODE_CLASS_MAPPINGS
    for name in set(nodes.NODE_CLASS_MAPPINGS) - before:
        nodes.NODE_CLASS_MAPPINGS.pop(name)
        nodes.NODE_DISPLAY_NAME_MAPPINGS.pop(name, None)


def run_node(node: type, **inputs):
    """One node executed as ComfyUI's executor runs it (execution.get_output_data); its first output."""
    import execution

    output, _, _, pending = asyncio.run(
        execution.get_output_data("test", "1", node, {k: [v] for k, v in inputs.items()})
    )
    assert not pending
    return output[0][0]


def _last(model):
    from stepcache.integrations.comfyui import patch_of

    return patch_of(model).last


def test_the_node_folder_loads_in_comfyui(registry, tmp_path):
    """comfyui-stepcache/ (linked or copied into custom_nodes/) and the folder the installer writes for a
    pip-installed stepcache both load through ComfyUI's custom node loader, with the three nodes."""
    import nodes

    from stepcache.integrations.comfyui.install import install_node

    for node_id, title in NODE_IDS.items():
        assert node_id in registry and nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == title
    info = registry["StepCache"].INPUT_TYPES()
    assert list(info["required"]) == ["model", "compute_fraction"]
    assert set(info["optional"]) == {"cache", "memory_budget_gb", "storage_dtype"}
    (tmp_path / "ComfyUI" / "custom_nodes").mkdir(parents=True)
    folder = install_node(tmp_path / "ComfyUI")
    assert asyncio.run(nodes.load_custom_node(str(folder)))


def test_stepcache_node_with_a_memory_budget_and_storage_dtype(registry, stepcache_folder):
    """The StepCache node run by ComfyUI's executor: the MODEL out is a clone; its first run calibrates,
    the next is cached. With fp16 storage and a memory budget of half the unbudgeted peak, the kept outputs
    stay within it (the schedule computes more where it must)."""
    family = "flux"
    model = _tiny.build(family)
    node = registry["StepCache"]
    free = run_node(node, model=model, compute_fraction=0.5, storage_dtype="fp16")
    assert free is not model and free.model is model.model
    _tiny.sample(free, family, steps=6)
    _tiny.sample(free, family, steps=6)
    peak = _last(free).stats.peak_stored_bytes
    assert _last(free).action == "cached" and peak > 0
    budget = peak // 2
    tight = run_node(
        node, model=model, compute_fraction=0.5, storage_dtype="fp16", memory_budget_gb=budget / 1e9
    )
    _tiny.sample(tight, family, steps=6)
    report = _last(tight)
    assert report.action == "cached"
    assert 0 < report.stats.peak_stored_bytes <= budget
    assert report.stats.compute_fraction >= 0.5 and "memory" in report.schedule.meta


def test_calibrate_then_schedule_file_nodes(registry, stepcache_folder):
    """StepCache Calibrate records every run into one calibration of the key and saves it; a schedule made from that calibration (stepcache's
    Python API) saved in models/stepcache is listed by StepCache (schedule file), which caches with it,
    resampled to a run of another step count. A calibration picked as a schedule is refused, saying why."""
    import stepcache
    from stepcache.integrations.comfyui.nodes import StepCacheScheduleFileNode

    family = "wan"
    model = _tiny.build(family)
    recording = run_node(registry["StepCacheCalibrate"], model=model)
    for samples in (
        1,
        2,
    ):  # each run (another seed: other generations) is one more sample of the key's calibration
        _tiny.sample(recording, family, seed=samples)
        report = _last(recording)
        assert report.action == "calibrated" and report.calibration.num_samples == samples
    cal = stepcache.Calibration.load(report.file)
    assert cal.num_steps == 4 and cal.num_samples == 2 and cal.meta["comfyui"]["sampler"] == "euler"
    schedule = stepcache.optimal_schedule(cal, 0.5)
    schedule.save(stepcache_folder / "wan-half.json")
    options = StepCacheScheduleFileNode.GET_SCHEMA().inputs[1].options
    assert "wan-half.json" in options
    cached = run_node(registry["StepCacheScheduleFile"], model=model, schedule="wan-half.json")
    _tiny.sample(cached, family)
    assert _last(cached).stats.compute_fraction == pytest.approx(schedule.compute_fraction)
    _tiny.sample(cached, family, steps=6)
    assert _last(cached).schedule.num_steps == 6 and _last(cached).stats.reused > 0
    first = run_node(registry["StepCache"], model=model, compute_fraction=0.5)
    _tiny.sample(first, family)
    assert _last(first).action == "cached" and _last(first).file == report.file
    from stepcache.errors import StepCacheError

    with pytest.raises(StepCacheError, match="not a stepcache schedule"):
        run_node(registry["StepCacheScheduleFile"], model=model, schedule=report.file)


def test_example_workflow(registry):
    """The example workflow is a ComfyUI workflow whose nodes all exist, whose links join outputs to
    inputs of the same type, and whose StepCache node has a widget value for each of its widgets."""
    path = NODE_FOLDER / "example_workflows" / "stepcache_flux.json"
    workflow = json.loads(path.read_text())
    by_id = {n["id"]: n for n in workflow["nodes"]}
    assert {n["type"] for n in workflow["nodes"]} <= set(registry)
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        assert by_id[src]["outputs"][src_slot]["type"] == kind
        assert link_id in by_id[src]["outputs"][src_slot]["links"]
        assert by_id[dst]["inputs"][dst_slot] == {
            **by_id[dst]["inputs"][dst_slot],
            "link": link_id,
            "type": kind,
        }
    stepcache_node = next(n for n in workflow["nodes"] if n["type"] == "StepCache")
    widgets = [
        k for part in registry["StepCache"].INPUT_TYPES().values() for k, v in part.items() if v[0] != "MODEL"
    ]
    assert len(stepcache_node["widgets_values"]) == len(widgets)
    assert torch.tensor(stepcache_node["widgets_values"][0]).item() == 0.5
