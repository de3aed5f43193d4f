"""The ComfyUI tests: real ComfyUI (the vendored copy, ../shared/vendor/ComfyUI or COMFYUI_DIR) sampling
tiny models of its own model classes on CPU. They run in their own environment (.venv-comfyui, made by
`make setup-comfyui`; `make test` runs them there); anywhere ComfyUI cannot be imported they skip, saying
why."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NEEDED = ("torchvision", "torchsde", "einops", "av", "transformers", "safetensors", "yaml", "psutil", "PIL")
SETUP = "make setup-comfyui, then run them with .venv-comfyui/bin/python -m pytest tests/comfyui (make test-comfyui)"


def comfyui_dir() -> Path:
    return Path(os.environ.get("COMFYUI_DIR") or ROOT.parent / "shared" / "vendor" / "ComfyUI").resolve()


@functools.lru_cache(maxsize=1)
def comfyui_missing() -> str | None:
    """Why ComfyUI cannot be imported here (None: it can)."""
    where = comfyui_dir()
    if not (where / "comfy" / "samplers.py").is_file():
        return f"no ComfyUI at {where} (set COMFYUI_DIR to a ComfyUI checkout)"
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:  # said before ComfyUI's folder goes on sys.path (its top-level names are generic)
        return f"ComfyUI's dependencies {missing} are not installed in this environment; {SETUP}"
    sys.path.insert(0, str(where))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before comfy.model_management: no GPU is assumed
        import comfy.model_management
        import comfy.samplers
        import comfy.utils
        import folder_paths  # noqa: F401
        import nodes  # noqa: F401

        comfy.utils.PROGRESS_BAR_ENABLED = False
    except Exception as e:  # torchvision that does not match torch, a missing dependency, ...
        sys.path.remove(str(where))
        for name, module in list(sys.modules.items()):
            if str(getattr(module, "__file__", None) or "").startswith(str(where)):
                del sys.modules[name]
        return f"ComfyUI does not import in this environment ({type(e).__name__}: {e}); {SETUP}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    mine = [item for item in items if here in Path(str(item.fspath)).parents]
    if not mine:
        return
    reason = comfyui_missing()
    if reason is not None:
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=f"ComfyUI tests: {reason}"))


@pytest.fixture
def stepcache_folder(tmp_path):
    """ComfyUI's `stepcache` model folder, pointed at a fresh temporary folder for one test."""
    import folder_paths

    from stepcache.integrations.comfyui import store

    store.folders()  # registered as ComfyUI does on first use
    saved = folder_paths.folder_names_and_paths[store.FOLDER]
    folder = tmp_path / "models" / "stepcache"
    folder_paths.folder_names_and_paths[store.FOLDER] = ([str(folder)], set(store.EXTENSIONS))
    folder_paths.filename_list_cache.pop(store.FOLDER, None)
    yield folder
    folder_paths.folder_names_and_paths[store.FOLDER] = saved
    folder_paths.filename_list_cache.pop(store.FOLDER, None)
