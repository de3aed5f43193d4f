"""Install the nodes into a ComfyUI: ``python -m stepcache.integrations.comfyui.install <ComfyUI folder>``.

ComfyUI loads nodes from folders under ``custom_nodes/``. With stepcache installed in ComfyUI's Python
environment (``pip install stepcache``), this writes ``custom_nodes/stepcache/__init__.py``, which
loads the nodes from the installed package. From a checkout of stepcache, linking its
``comfyui-stepcache`` folder into ``custom_nodes/`` does the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["NODE_FOLDER", "install_node"]

NODE_FOLDER = "stepcache"
SHELL = '''"""stepcache's ComfyUI nodes, from the stepcache package installed in this Python environment."""

from stepcache.integrations.comfyui.nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
'''


def install_node(comfyui: str | Path) -> Path:
    """Write the node folder into ``comfyui/custom_nodes`` (or ``comfyui`` itself when it is the
    custom nodes folder); returns the folder. Rewrites a folder it wrote before."""
    base = Path(comfyui).expanduser()
    nodes = base if base.name == "custom_nodes" else base / "custom_nodes"
    if not nodes.is_dir():
        raise FileNotFoundError(
            f"{nodes} is not a folder: pass ComfyUI's folder (the one with custom_nodes/)."
        )
    folder = nodes / NODE_FOLDER
    folder.mkdir(exist_ok=True)
    (folder / "__init__.py").write_text(SHELL)
    return folder


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m stepcache.integrations.comfyui.install <ComfyUI folder>", file=sys.stderr)
        return 2
    try:
        folder = install_node(args[0])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"stepcache nodes installed in {folder}; restart ComfyUI to load them.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
