"""Optional packages in tests: skipped locally when absent, a failure under CI=true."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if in_ci():
            pytest.fail(f"optional package {module!r} is required in CI but missing: {exc}")
        pytest.skip(f"{module} not installed")
