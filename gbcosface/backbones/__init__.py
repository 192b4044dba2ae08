"""Face backbones: 112x112 RGB images normalised to [-1, 1] -> ``embedding_size`` features.

Every backbone exposes ``embedding_size``; ``build_backbone`` is the one place names resolve.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .iresnet import IResNet, iresnet18, iresnet50, iresnet100
from .mobilefacenet import MobileFaceNet
from .tiny import TinyNet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "iresnet18": iresnet18,
    "iresnet50": iresnet50,
    "iresnet100": iresnet100,
    "mobilefacenet": MobileFaceNet,
    "tiny": TinyNet,
}
# InsightFace's short names, so its configs and model files can be named as they are.
_ALIASES = {"r18": "iresnet18", "r50": "iresnet50", "r100": "iresnet100", "mbf": "mobilefacenet"}


def unwrap(model: nn.Module) -> nn.Module:
    """The backbone inside DDP / DeepSpeed wrappers (their ``.module``): what evaluation runs,
    free of the wrappers' forward hooks, and what is saved, without a ``module.`` key prefix."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def backbone_names() -> list[str]:
    """Known names, aliases included."""
    return sorted(_REGISTRY) + sorted(_ALIASES)


def build_backbone(name: str, embedding_size: int = 512, **kw) -> nn.Module:
    """Build a backbone by name (``iresnet18/50/100``, ``mobilefacenet``, ``tiny``, or the
    aliases ``r18/r50/r100/mbf``); ``kw`` goes to its constructor (e.g. ``dropout``, ``blocks``)."""
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(backbone_names())}")
    if embedding_size < 1:
        raise ValueError(f"backbone {name!r}: embedding_size must be positive, got {embedding_size}")
    try:
        return _REGISTRY[key](embedding_size=embedding_size, **kw)
    except TypeError as exc:
        raise ValueError(f"backbone {name!r}: bad options {sorted(kw)}: {exc}") from None


__all__ = ["IResNet", "MobileFaceNet", "TinyNet", "backbone_names", "build_backbone",
           "iresnet18", "iresnet50", "iresnet100", "unwrap"]
