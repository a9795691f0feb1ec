"""Unit tests of attention/: plain PyTorch, no ComfyUI.

Registers the checkout as the namespace package `spectral_anchors` without running the pack's
__init__.py (which imports comfy), so `spectral_anchors.attention.<module>` imports directly.
If the real pack is already loaded under that name, it is left in place.
"""

import pathlib
import sys
import types

PACK_ROOT = pathlib.Path(__file__).resolve().parents[2]

if "spectral_anchors" not in sys.modules:
    package = types.ModuleType("spectral_anchors")
    package.__path__ = [str(PACK_ROOT)]
    sys.modules["spectral_anchors"] = package
