"""stepcache in ComfyUI: calibrated step caching nodes on ComfyUI's own models and sampler.

* :mod:`.families`: ComfyUI's diffusion model classes (``comfy.ldm.*``) as data: the block lists to
  cache, whole blocks or branches, and whether blocks update their inputs in place (their block
  layouts are in :mod:`stepcache.layouts` with the others);
* :mod:`.keys`: the key of a sampling run (model, LoRA patches, sampler, sigmas, guidance, latent
  shape) that names its calibration file;
* :mod:`.store`: the ``stepcache`` model folder (ComfyUI's ``models/stepcache``);
* :mod:`.patch`: the wrappers a node puts on a clone of the MODEL, which calibrate or cache each
  run on ComfyUI's sampler (steps from its evaluations, guidance branches from its batches);
* :mod:`.nodes`: the nodes, in ComfyUI's node API (imports ``comfy_api``: loaded by ComfyUI through
  the ``comfyui-stepcache`` custom node folder, or :func:`.install.install_node`).

Nothing here imports ComfyUI until a model is patched or a node is loaded: ``import stepcache`` needs
no ComfyUI.
"""

from .families import CACHE_MODES, FAMILIES, Family, family_of
from .patch import RunReport, Settings, StepCachePatch, apply, patch_of

__all__ = [
    "CACHE_MODES",
    "FAMILIES",
    "Family",
    "RunReport",
    "Settings",
    "StepCachePatch",
    "apply",
    "family_of",
    "patch_of",
]
