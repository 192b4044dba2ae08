"""Run comparison: one TAR@FAR table and one ROC PNG from saved scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gbcosface.eval import compare
from gbcosface.eval.plot import PALETTE
from gbcosface.eval.roc import tar_at_far


def _run(path: Path, separation: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(5000) < 0.2
    scores = rng.normal(size=5000) + separation * labels
    path.mkdir(parents=True)
    np.save(path / "scores.npy", scores)
    np.save(path / "labels.npy", labels)
    return scores, labels


def test_table_and_plot(tmp_path: Path, capsys) -> None:
    a = _run(tmp_path / "gbcosface" / "ijbc", 3.0, 0)
    b = _run(tmp_path / "cosface" / "ijbc", 2.0, 1)
    png = tmp_path / "cmp.png"
    compare.main([str(tmp_path / "gbcosface/ijbc"), str(tmp_path / "cosface/ijbc"), "--output", str(png),
                  "--fars", "1e-3", "1e-2", "1e-1"])
    lines = capsys.readouterr().out.splitlines()
    row = {ln.split()[0]: ln.split()[1:] for ln in lines[1:3]}
    assert set(row) == {"gbcosface/ijbc", "cosface/ijbc"}
    for name, (scores, labels) in (("gbcosface/ijbc", a), ("cosface/ijbc", b)):
        expected = tar_at_far(scores, labels, [1e-3, 1e-2, 1e-1])
        assert [float(c) for c in row[name]] == pytest.approx([100 * v for v in expected.values()], abs=0.006)
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    for color in PALETTE[:2]:  # one curve (and legend entry) per run
        assert (np.abs(pixels.astype(int) - color).sum(1) == 0).sum() > 100


def test_missing_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    np.save(tmp_path / "run/scores.npy", np.zeros(3))
    with pytest.raises(FileNotFoundError, match=r"run/labels.npy not found"):
        compare.compare([tmp_path / "run"])
    np.save(tmp_path / "run/labels.npy", np.zeros(4, dtype=bool))
    with pytest.raises(ValueError, match="scores.npy has 3 entries, labels.npy 4"):
        compare.compare([tmp_path / "run"])


def test_cli_reports_user_errors_in_one_line(tmp_path: Path, capsys) -> None:
    from gbcosface.eval.cli import run

    assert run(lambda: compare.main([str(tmp_path / "nowhere")])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nowhere/scores.npy not found" in err and "\n" not in err


def test_progress_line_reaches_total() -> None:
    import io

    from gbcosface.progress import Progress

    stream = io.StringIO()
    bar = Progress(10, desc="embed", unit="img", stream=stream, every_s=0.0)
    assert sum(1 for _ in bar.wrap([np.zeros(4), np.zeros(4), np.zeros(2)])) == 3
    lines = stream.getvalue().splitlines(keepends=True)
    assert lines[-1].startswith("embed | 10/10") and lines[-1].endswith("\n") and "ETA" in lines[-1]
