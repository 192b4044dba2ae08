"""ROC and TAR@FAR for 1:1 verification scores, in numpy.

Threshold semantics: a pair is accepted when ``score >= t``. Thresholds are the distinct
score values (plus ``+inf``, accept nothing), so pairs with tied scores are accepted or
rejected together: no point of the curve splits a tie.

``tar_at_far(f)`` is the highest TAR over thresholds whose FAR is ``<= f``. With ``N``
negatives the achievable FARs are ``0, 1/N, 2/N, ...``; for ``f < 1/N`` only FAR 0 qualifies,
so the value reported is the TAR at the strictest threshold with no false accept (the share of
positives scoring strictly above every negative). That value is not a measurement at ``f``:
:func:`min_resolvable_far` says where the data stops resolving, and tables mark such cells.
(InsightFace's IJB scripts instead take the ROC point whose FAR is nearest ``f``, which can
exceed ``f``.)
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.size}) and labels ({labels.size}) differ in length")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int(np.sum(~np.isfinite(scores)))} scores are NaN or infinite")
    if labels.all() or not labels.any():
        raise ValueError("ROC needs both positive and negative pairs")
    return scores, labels


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``, one point per distinct score, strictest first.

    The first point is ``(0, 0, +inf)``; point ``i`` accepts every score ``>= thresholds[i]``.
    Both rates are non-decreasing along the arrays.
    """
    scores, labels = _check(scores, labels)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    # The last index of each run of equal scores: the whole tie enters together.
    ends = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(y)[ends]
    fp = (ends + 1) - tp
    tpr = np.r_[0.0, tp / labels.sum()]
    fpr = np.r_[0.0, fp / (~labels).sum()]
    return fpr, tpr, np.r_[np.inf, s[ends]]


def tar_at_far(scores: np.ndarray, labels: np.ndarray, fars: Iterable[float] = DEFAULT_FARS) -> dict[float, float]:
    """The highest TAR whose FAR is ``<= far``, for each ``far`` (see the module notes for
    ``far`` below ``1/#negatives``)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    out: dict[float, float] = {}
    for far in fars:
        if not 0.0 <= far <= 1.0:
            raise ValueError(f"FAR must lie in [0, 1], got {far}")
        # fpr is non-decreasing and tpr with it, so the last point with fpr <= far is the best.
        i = int(np.searchsorted(fpr, far, side="right")) - 1
        out[float(far)] = float(tpr[i])
    return out


def threshold_at_far(scores: np.ndarray, labels: np.ndarray, far: float) -> float:
    """The score threshold that realises ``tar_at_far`` at ``far`` (``inf``: accept nothing)."""
    fpr, _, thr = roc_curve(scores, labels)
    return float(thr[int(np.searchsorted(fpr, far, side="right")) - 1])


def min_resolvable_far(labels: np.ndarray) -> float:
    """``1/#negatives``: below this FAR, ``tar_at_far`` reports the FAR-0 operating point."""
    n_neg = int((~np.asarray(labels).ravel().astype(bool)).sum())
    return 1.0 / n_neg if n_neg else float("inf")


def format_far(far: float) -> str:
    """``1e-6`` style labels for table headers."""
    return f"{far:.0e}".replace("e-0", "e-") if far else "0"


def format_table(rows: dict[str, tuple[dict[float, float], float]], title: str = "TAR@FAR") -> str:
    """A plain-text table: one row per name, one column per FAR, TAR in percent.

    ``rows`` maps a name to ``(tar_at_far result, min_resolvable_far)``; a ``*`` marks cells
    whose FAR lies below the run's ``1/#negatives`` (FAR-0 operating point, see module notes).
    """
    fars = sorted({f for res, _ in rows.values() for f in res})
    width = max([len(title)] + [len(n) for n in rows])
    lines = [f"{title:<{width}} " + " ".join(f"{format_far(f):>9}" for f in fars)]
    starred = False
    for name, (res, min_far) in rows.items():
        cells = []
        for f in fars:
            if f not in res:
                cells.append(f"{'-':>9}")
                continue
            mark = "*" if f < min_far else " "
            starred |= mark == "*"
            cells.append(f"{100 * res[f]:8.2f}{mark}")
        lines.append(f"{name:<{width}} " + " ".join(cells))
    if starred:
        lines.append("* FAR below 1/#negatives: TAR at the strictest threshold with no false accept")
    return "\n".join(lines)
