"""Lay several evaluated runs side by side: one TAR@FAR table and one ROC PNG.

A run directory holds ``scores.npy`` (one score per pair, higher = more alike) and
``labels.npy`` (bool, same length), as written by ``eval.ijb`` and ``eval.verification``.

    python -m gbcosface.eval.compare runs/gbcosface/ijbc runs/cosface/ijbc --output compare.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gbcosface.eval.plot import plot_roc
from gbcosface.eval.roc import DEFAULT_FARS, format_table, min_resolvable_far, roc_curve, tar_at_far
from gbcosface.eval.cli import run


def load_run(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, labels)`` of a run directory, checked for presence and matching lengths."""
    run_dir = Path(run_dir)
    arrays = []
    for name in ("scores.npy", "labels.npy"):
        f = run_dir / name
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: a run directory needs scores.npy and labels.npy")
        arrays.append(np.load(f, allow_pickle=False).ravel())
    scores, labels = arrays
    if scores.shape != labels.shape:
        raise ValueError(f"{run_dir}: scores.npy has {scores.size} entries, labels.npy {labels.size}")
    return scores, labels.astype(bool)


def run_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """Short unique legend names: the shortest path suffixes that tell the runs apart."""
    parts = [Path(r).resolve().parts for r in run_dirs]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(r) for r in run_dirs]


def compare(run_dirs: Sequence[str | Path], output: str | Path | None = None,
            fars: Sequence[float] = DEFAULT_FARS, title: str = "ROC") -> str:
    """The table as text; writes the ROC PNG to ``output`` when given."""
    rows, curves = {}, {}
    for name, run_dir in zip(run_labels(run_dirs), run_dirs):
        scores, labels = load_run(run_dir)
        rows[name] = (tar_at_far(scores, labels, fars), min_resolvable_far(labels))
        curves[name] = roc_curve(scores, labels)[:2]
    if output is not None:
        plot_roc(curves, output, title=title, min_far=min([f for f in fars if f > 0], default=1e-6))
    return format_table(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gbcosface.eval.compare", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories with scores.npy and labels.npy")
    p.add_argument("--output", default="compare_roc.png", help="ROC PNG to write")
    p.add_argument("--fars", type=float, nargs="+", default=list(DEFAULT_FARS))
    p.add_argument("--title", default="ROC")
    args = p.parse_args(argv)
    print(compare(args.runs, args.output, args.fars, args.title))
    print(f"ROC plot: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
