"""stepcache's ComfyUI nodes: link or copy this folder into ComfyUI's ``custom_nodes/``.

A thin shell: the nodes are ``stepcache.integrations.comfyui.nodes``. They come from the stepcache
installed in ComfyUI's Python environment, or else from the checkout this folder belongs to.
"""

import os
import sys

try:
    import stepcache  # noqa: F401
except ImportError:  # not installed: use the package source beside this folder (a checkout of stepcache)
    _src = os.path.join(os.path.dirname(os.path.realpath(__file__)), os.pardir, "src")
    if not os.path.isdir(os.path.join(_src, "stepcache")):
        raise
    sys.path.insert(0, os.path.abspath(_src))

from stepcache.integrations.comfyui.nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
