"""5-point face alignment to InsightFace's 112x112 ArcFace template.

The similarity transform (rotation, uniform scale, translation) is the least-squares fit of
Umeyama (1991); the warp is Pillow's bilinear AFFINE transform. Coordinates follow the
convention of the template and of detector landmarks (pixel ``i``'s centre at ``i``), which
the warp converts to Pillow's (centre at ``i + 0.5``).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Left eye, right eye, nose tip, left and right mouth corners in a 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity ``M`` minimising ``sum |M @ [src_i, 1] - dst_i|^2`` (no reflection)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"umeyama needs two [K, 2] point sets with K >= 2, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    var_s = (sc ** 2).sum(1).mean()
    if var_s <= 0:
        raise ValueError("umeyama: all source points coincide")
    cov = dc.T @ sc / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) > 0 else -1.0])
    rot = u @ np.diag(d) @ vt
    scale = (s * d).sum() / var_s
    shift = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, shift[:, None]])


def align_face(image: Image.Image, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp ``image`` so its five ``landmarks`` land on the template: uint8 ``[size, size, 3]``
    RGB, black outside the source. ``size`` other than 112 scales the template."""
    template = ARCFACE_TEMPLATE * (size / 112.0)
    m = umeyama(np.asarray(landmarks, dtype=np.float64).reshape(5, 2), template)
    a_inv = np.linalg.inv(m[:, :2])
    t_inv = -a_inv @ m[:, 2]
    # Pillow asks for output->input in corner coordinates: p_in = A p_out + (t + 0.5 - A 0.5).
    t_pil = t_inv + 0.5 - a_inv @ np.array([0.5, 0.5])
    coeffs = (a_inv[0, 0], a_inv[0, 1], t_pil[0], a_inv[1, 0], a_inv[1, 1], t_pil[1])
    out = image.convert("RGB").transform((size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR,
                                         fillcolor=(0, 0, 0))
    return np.asarray(out)
