"""JPEG encode/decode for the data tools and the torch loader.

Decoding uses simplejpeg when it is installed (the ``[fastjpeg]`` extra, about 2.5x Pillow's
speed here) and Pillow otherwise. Encoding always uses Pillow so that files written by
``pack`` and ``synthetic`` are byte-identical for a given seed whichever extras are present.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

try:  # optional speed-up
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the installed extras
    _simplejpeg = None


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """RGB uint8 ``[H, W, 3]`` -> JPEG bytes (Pillow, deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_image(data: bytes, backend: str | None = None) -> np.ndarray:
    """JPEG (or any Pillow format) bytes -> RGB uint8 ``[H, W, 3]``.

    ``backend``: ``"simplejpeg"``, ``"pillow"`` or ``None`` (simplejpeg for JPEG when installed).
    Raises ``ValueError`` on bytes that are not an image.
    """
    if backend in (None, "simplejpeg") and _simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            return _simplejpeg.decode_jpeg(data, colorspace="RGB")
        except Exception as exc:  # simplejpeg raises its own types
            raise ValueError(f"undecodable JPEG ({exc})") from None
    if backend == "simplejpeg" and _simplejpeg is None:
        raise ImportError("simplejpeg is not installed (pip install gbcosface[fastjpeg])")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:
        raise ValueError(f"undecodable image ({type(exc).__name__}: {exc})") from None


def has_simplejpeg() -> bool:
    return _simplejpeg is not None
