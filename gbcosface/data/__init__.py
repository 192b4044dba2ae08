"""Training data: RecordIO without MXNet, packing tools, torch/DALI/synthetic loaders.

``build_loader`` is the entry point. Names are imported lazily so that the command-line tools
(``python -m gbcosface.data.pack``) start without importing torch, and ``nvidia.dali`` is
imported only for the DALI backend.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"BACKENDS": "loader", "SyntheticLoader": "loader", "build_loader": "loader",
            "build_loader_from_config": "loader"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
