"""StepCache on ComfyUI's own sampler path (nodes.common_ksampler -> comfy.samplers) and model classes."""

from __future__ import annotations

import pytest
import torch

from tests.comfyui import _tiny

# Each test takes well under a second (tiny models, 4-6 steps): none is marked slow. Importing ComfyUI
# (about 5 s) is most of the module's time.
FAMILIES = list(_tiny.CONFIGS)


def _patched(model, **settings):
    from stepcache.integrations.comfyui import Settings, apply

    return apply(model, Settings(**settings))


def _last(model):
    from stepcache.integrations.comfyui import patch_of

    return patch_of(model).last


@pytest.mark.parametrize("family", FAMILIES)
def test_all_compute_is_bit_identical_to_no_node(family, stepcache_folder):
    """Compute fraction 1: the calibrating run and the cached run both give the latents of no node,
    bit for bit, and the cached run computed every component call."""
    model = _tiny.build(family)
    reference = _tiny.sample(model, family)
    patched = _patched(model, compute_fraction=1.0)
    first = _tiny.sample(patched, family)
    report = _last(patched)
    assert report.action == "calibrated" and report.evaluations == 4
    assert torch.equal(first, reference)
    second = _tiny.sample(patched, family)
    report = _last(patched)
    assert report.action == "cached"
    assert torch.equal(second, reference)
    assert report.stats.compute_fraction == 1.0 and report.stats.reused == 0
    assert report.stats.computed == len(report.calibration.components) * 4


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_run_computes_the_scheduled_fraction(family, stepcache_folder):
    """The second run of a key is cached: it computes the schedule's share of component calls, and its
    latents stay close to the uncached ones. The calibration went to ComfyUI's models/stepcache and a
    new node finds it there (its first run is cached)."""
    model = _tiny.build(family)
    reference = _tiny.sample(model, family, steps=6)
    patched = _patched(model, compute_fraction=0.5)
    _tiny.sample(patched, family, steps=6)
    calibrated = _last(patched)
    assert calibrated.action == "calibrated"
    assert calibrated.file is not None and calibrated.file.startswith(str(stepcache_folder))
    out = _tiny.sample(patched, family, steps=6)
    report = _last(patched)
    assert report.action == "cached"
    stats, schedule = report.stats, report.schedule
    assert stats.reused > 0
    assert stats.compute_fraction == pytest.approx(schedule.compute_fraction)
    assert schedule.compute_fraction == pytest.approx(0.5, abs=0.1)
    assert not torch.equal(out, reference)
    assert (out - reference).norm() / reference.norm() < 0.2
    fresh = _patched(model, compute_fraction=0.5)
    again = _tiny.sample(fresh, family, steps=6)
    assert _last(fresh).action == "cached" and _last(fresh).file == calibrated.file
    assert torch.equal(again, out)


@pytest.mark.parametrize("tokens, branches", [((6, 6), 1), ((5, 6), 2)], ids=["batched", "split"])
def test_cond_and_uncond(tokens, branches, stepcache_folder):
    """Classifier-free guidance as ComfyUI's sampler batches it: cond and uncond in one call (their
    contexts pad to one length), or in two calls (5 and 6 tokens do not). Each call is a guidance branch
    with outputs of its own: all-compute stays bit-identical, and a cached run counts every branch."""
    family = "wan"
    model = _tiny.build(family)
    reference = _tiny.sample(model, family, tokens=tokens)
    exact = _patched(model, compute_fraction=1.0)
    _tiny.sample(exact, family, tokens=tokens)
    assert _last(exact).branches == branches
    assert torch.equal(_tiny.sample(exact, family, tokens=tokens), reference)
    cached = _patched(model, compute_fraction=0.5)
    out = _tiny.sample(cached, family, tokens=tokens)
    report = _last(cached)
    assert report.action == "cached" and report.branches == branches
    calls = report.stats.computed + report.stats.reused
    assert calls == len(report.calibration.components) * 4 * branches
    assert report.stats.compute_fraction == pytest.approx(report.schedule.compute_fraction)
    assert (out - reference).norm() / reference.norm() < 0.2
    # cfg 1: ComfyUI skips the uncond; the key changes (guidance), one branch.
    single = _patched(model, compute_fraction=1.0)
    plain = _tiny.sample(model, family, cfg=1.0, tokens=tokens)
    assert torch.equal(_tiny.sample(single, family, cfg=1.0, tokens=tokens), plain)
    assert _last(single).action == "calibrated" and _last(single).branches == 1


def test_branches_follow_the_conds_not_the_call_order():
    """A call's branch is the set of conds it carries (their uuids), whatever order the sampler runs
    them in from one evaluation to the next."""
    from stepcache.integrations.comfyui.patch import _Run
    from stepcache.runtime import StepTracker

    tracker = StepTracker()
    run = _Run(tracker)
    seen = []
    for order in (("a", "b"), ("b", "a"), ("a", "b")):
        run.evaluation()
        for u in order:
            run.place({"uuids": [u]})
            seen.append((tracker.step, u, tracker.branch))
    branch = {u: b for _, u, b in seen[:2]}
    assert all(b == branch[u] for _, u, b in seen)
    assert [s for s, _, _ in seen] == [0, 0, 1, 1, 2, 2] and run.most_branches == 2
    # Without PREDICT_NOISE around the evaluations (a guider of other make), a cond seen again starts the
    # next step.
    run, steps = _Run(StepTracker()), []
    for u in ("a", "b", "a", "b", "b", "a"):
        run.place({"uuids": [u]})
        steps.append((run.tracker.step, run.tracker.branch))
    assert steps == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1), (2, 0)]


def test_in_place_blocks_keep_what_they_cached(stepcache_folder, monkeypatch, tmp_path):
    """Flux's blocks add to their input in place (img += ...): a kept block output must not be what the
    next block then overwrites. A schedule that reuses the first single-stream block at step 2 gives the
    latents of a reference made with plain torch hooks (keep that block's step-1 output, return it at
    step 2), bit for bit; without the copies it would not."""
    from stepcache import Schedule
    from stepcache.integrations.comfyui import families

    family = "flux"
    model = _tiny.build(family)
    block = model.model.diffusion_model.single_blocks[0]
    state = {"call": -1, "kept": None}

    def count(module, args, kwargs):
        state["call"] += 1

    def swap(module, args, output):
        if state["call"] == 1:
            state["kept"] = output.clone()
        if state["call"] == 2:
            return state["kept"].clone()
        return output

    top = model.model.diffusion_model.register_forward_pre_hook(count, with_kwargs=True)
    hook = block.register_forward_hook(swap)
    try:
        reference = _tiny.sample(model, family, cfg=1.0)
    finally:
        top.remove()
        hook.remove()
    schedule = Schedule(4, {"single_blocks.0": (1, 1, 0, 1)})
    assert torch.equal(
        _tiny.sample(_patched(model, mode="schedule", schedule=schedule), family, cfg=1.0), reference
    )
    monkeypatch.setitem(families.FAMILIES, "Flux", families.Family("flux", families._FLUX.stacks, "blocks"))
    aliased = _tiny.sample(_patched(model, mode="schedule", schedule=schedule), family, cfg=1.0)
    assert not torch.equal(aliased, reference)


def test_a_new_step_count_calibrates_again(stepcache_folder):
    """Steps are in the key: 4 steps calibrated and cached, then 6 steps calibrate afresh (and save a
    second file), then 6 steps are cached."""
    family = "flux"
    patched = _patched(_tiny.build(family), compute_fraction=0.5)
    actions = []
    for steps in (4, 4, 6, 6):
        _tiny.sample(patched, family, steps=steps)
        report = _last(patched)
        actions.append((report.action, report.evaluations))
    assert actions == [("calibrated", 4), ("cached", 4), ("calibrated", 6), ("cached", 6)]
    assert len(list(stepcache_folder.glob("*.json"))) == 2


def test_two_evaluations_per_step(stepcache_folder):
    """Heun evaluates the model twice per step (the last step once): each evaluation is a schedule step,
    in the calibration and in the cached run alike."""
    family = "wan"
    model = _tiny.build(family)
    reference = _tiny.sample(model, family, steps=3, sampler="heun")
    patched = _patched(model, compute_fraction=1.0)
    _tiny.sample(patched, family, steps=3, sampler="heun")
    assert _last(patched).evaluations == 5 and _last(patched).calibration.num_steps == 5
    assert torch.equal(_tiny.sample(patched, family, steps=3, sampler="heun"), reference)
    assert _last(patched).action == "cached" and not _last(patched).overflowed


def test_an_interrupted_run_leaves_nothing_and_the_next_starts_afresh(stepcache_folder):
    """ComfyUI's interrupt raises from inside a model call: the cache is removed, and the next run is the
    same as if the interrupted one had never been (an interrupted calibration saves nothing)."""
    import comfy.model_management as mm

    family = "flux"
    model = _tiny.build(family)
    patched = _patched(model, compute_fraction=0.5)
    dm = model.model.diffusion_model
    calls = {"n": 0}

    def interrupt_at_third(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            mm.interrupt_current_processing(True)

    def interrupted() -> None:
        calls["n"] = 0
        hook = dm.register_forward_pre_hook(interrupt_at_third, with_kwargs=True)
        try:
            with pytest.raises(mm.InterruptProcessingException):
                _tiny.sample(patched, family)
        finally:
            hook.remove()
            mm.interrupt_current_processing(False)

    interrupted()  # during the calibrating run
    assert not list(stepcache_folder.glob("*.json"))
    _tiny.sample(patched, family)
    assert _last(patched).action == "calibrated"
    clean = _tiny.sample(patched, family)
    assert _last(patched).action == "cached"
    interrupted()  # during a cached run
    assert not dm._forward_hooks and not dm._forward_pre_hooks
    assert torch.equal(_tiny.sample(patched, family), clean)


def test_a_model_with_nothing_to_cache_samples_as_without_the_node(stepcache_folder, monkeypatch):
    """When discovery finds nothing to cache (here Flux read as branches of its single-stream blocks,
    which have none), the node says so and the run samples exactly as without it."""
    from stepcache.integrations.comfyui import families

    family = "flux"
    model = _tiny.build(family)
    reference = _tiny.sample(model, family)
    monkeypatch.setitem(families.FAMILIES, "Flux", families.Family("flux", ("single_blocks",)))
    patched = _patched(model, compute_fraction=0.5)
    assert torch.equal(_tiny.sample(patched, family), reference)
    assert _last(patched).action == "uncached"
    assert not list(stepcache_folder.glob("*.json"))
