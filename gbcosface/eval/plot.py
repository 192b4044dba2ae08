"""ROC plots as PNG with numpy + Pillow only (no plotting library dependency).

FAR on a log axis (one gridline per decade), TAR linear; one coloured polyline per curve, a
legend. Curves with millions of points are reduced to one point per pixel column first.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def _pixel_points(fpr: np.ndarray, tpr: np.ndarray, to_px) -> list[tuple[float, float]]:
    x, y = to_px(fpr, tpr)
    col = np.floor(x).astype(np.int64)
    keep = np.r_[np.nonzero(np.diff(col))[0], len(col) - 1]  # last (highest-TAR) point per column
    return list(zip(x[keep].tolist(), y[keep].tolist()))


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "ROC",
             min_far: float = 1e-6, size: tuple[int, int] = (800, 600)) -> Path:
    """Write a ROC PNG: ``curves`` maps a legend label to ``(fpr, tpr)`` arrays (as from
    :func:`gbcosface.eval.roc.roc_curve`). FAR spans ``[min_far, 1]``; points below it are
    drawn at the left edge."""
    width, height = size
    left, right, top, bottom = 70, 20, 40, 55
    pw, ph = width - left - right, height - top - bottom
    lo_dec = math.floor(math.log10(min_far))
    visible = [t[f >= min_far] for f, t in curves.values() if np.any(f >= min_far)]
    lowest = min((float(v.min()) for v in visible if v.size), default=0.0)
    y_lo = max(0.0, math.floor(lowest * 10) / 10 - 0.1) if visible else 0.0
    step = 0.05 if 1.0 - y_lo <= 0.3 else 0.1

    def to_px(f: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lf = np.log10(np.clip(np.asarray(f, dtype=np.float64), 10.0 ** lo_dec, 1.0))
        x = left + (lf - lo_dec) / (0 - lo_dec) * pw
        y = top + (1.0 - (np.asarray(t, dtype=np.float64) - y_lo) / (1.0 - y_lo)) * ph
        return x, np.clip(y, top, top + ph)

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    grid, ink = (225, 225, 225), (0, 0, 0)
    for dec in range(lo_dec, 1):
        x = left + (dec - lo_dec) / (0 - lo_dec) * pw
        draw.line([(x, top), (x, top + ph)], fill=grid)
        draw.text((x, top + ph + 6), f"1e{dec}" if dec else "1", fill=ink, font=font, anchor="ma")
    for k in range(int(round((1.0 - y_lo) / step)) + 1):
        tv = y_lo + k * step
        y = top + (1.0 - (tv - y_lo) / (1.0 - y_lo)) * ph
        draw.line([(left, y), (left + pw, y)], fill=grid)
        draw.text((left - 6, y), f"{tv:.2f}", fill=ink, font=font, anchor="rm")
    draw.rectangle([left, top, left + pw, top + ph], outline=ink)
    draw.text((left + pw / 2, 12), title, fill=ink, font=font, anchor="ma")
    draw.text((left + pw / 2, height - 18), "FAR (log scale)", fill=ink, font=font, anchor="ma")
    draw.text((8, top + ph / 2), "TAR", fill=ink, font=font, anchor="lm")
    for i, (label, (fpr, tpr)) in enumerate(curves.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = _pixel_points(np.asarray(fpr), np.asarray(tpr), to_px)
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        ly = top + ph - 16 * (len(curves) - i) - 4
        draw.line([(left + pw - 170, ly), (left + pw - 145, ly)], fill=color, width=3)
        draw.text((left + pw - 140, ly), label, fill=ink, font=font, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
