"""Loading order fixes for native libraries that clash inside one napari process.

Triton (a dependency of CUDA builds of torch, imported by torchvision through
``torch._dynamo``) bundles its own LLVM. When Mesa's software OpenGL
(llvmpipe, which links the system LLVM) is already loaded, as in napari under
Xvfb, over remote desktops or in VMs, loading ``libtriton`` resolves LLVM
symbols against Mesa's copy and the process dies with a segmentation fault.
Loading triton with ``RTLD_DEEPBIND`` makes it bind to its own LLVM first.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

__all__ = ["import_torchvision", "preload_triton"]

_done = False


def preload_triton() -> None:
    """Import triton with ``RTLD_DEEPBIND`` (Linux) before torchvision is imported; harmless when absent."""
    global _done
    if _done or "triton" in sys.modules:
        return
    _done = True
    deepbind = getattr(os, "RTLD_DEEPBIND", None)
    if deepbind is None or not hasattr(sys, "setdlopenflags"):
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | deepbind)
    try:
        import triton  # noqa: F401
    except Exception:  # not installed or broken: torch then runs without it
        pass
    finally:
        sys.setdlopenflags(flags)


def import_torchvision(module: str) -> ModuleType:
    """Import a torchvision module (e.g. ``"torchvision.models.inception"``) after :func:`preload_triton`."""
    preload_triton()
    return importlib.import_module(module)
