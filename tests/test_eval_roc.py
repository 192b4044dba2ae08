"""ROC / TAR@FAR against scikit-learn and a brute-force count, with ties and tiny FARs."""

from __future__ import annotations

import numpy as np
import pytest

from gbcosface.eval.roc import format_table, min_resolvable_far, roc_curve, tar_at_far, threshold_at_far
from tests.optional import require


def _cases():
    rng = np.random.default_rng(7)
    labels = rng.random(3000) < 0.25
    yield "random", rng.normal(size=3000) + 1.5 * labels, labels
    labels = rng.random(2000) < 0.4
    yield "tied", np.round(rng.normal(size=2000) + labels, 1), labels  # ~60 distinct values
    labels = rng.random(500) < 0.5
    yield "few-values", rng.integers(0, 4, 500).astype(float) + labels, labels


CASES = list(_cases())
FARS = [0.0, 1e-6, 1e-4, 1e-3, 2e-3, 0.01, 0.05, 0.1, 0.3, 1.0]


@pytest.mark.parametrize("name,scores,labels", CASES, ids=[c[0] for c in CASES])
def test_roc_curve_matches_sklearn(name: str, scores: np.ndarray, labels: np.ndarray) -> None:
    metrics = require("sklearn.metrics")
    fpr, tpr, thr = roc_curve(scores, labels)
    ref_fpr, ref_tpr, ref_thr = metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_array_equal(fpr, ref_fpr)
    np.testing.assert_array_equal(tpr, ref_tpr)
    np.testing.assert_array_equal(thr[1:], ref_thr[1:])  # sklearn >= 1.3 also starts at +inf


@pytest.mark.parametrize("name,scores,labels", CASES, ids=[c[0] for c in CASES])
def test_tar_at_far_matches_sklearn(name: str, scores: np.ndarray, labels: np.ndarray) -> None:
    metrics = require("sklearn.metrics")
    ref_fpr, ref_tpr, _ = metrics.roc_curve(labels, scores, drop_intermediate=False)
    n_neg = int((~labels).sum())
    fars = FARS + [k / n_neg for k in (1, 2, 17)]  # exactly achievable FARs too
    got = tar_at_far(scores, labels, fars)
    for far in fars:
        assert got[far] == ref_tpr[ref_fpr <= far].max(), far


@pytest.mark.parametrize("name,scores,labels", CASES, ids=[c[0] for c in CASES])
def test_tar_at_far_brute_force(name: str, scores: np.ndarray, labels: np.ndarray) -> None:
    pos, neg = scores[labels], scores[~labels]
    got = tar_at_far(scores, labels, FARS)
    for far in FARS:
        best = 0.0  # threshold +inf: nothing accepted
        for t in np.unique(scores):
            if np.mean(neg >= t) <= far:
                best = max(best, np.mean(pos >= t))
        assert got[far] == pytest.approx(best, abs=0), far


def test_ties_move_together() -> None:
    # pos 0.9, then a tie at 0.8 of one negative and one positive, then a negative at 0.1.
    scores = np.array([0.9, 0.8, 0.8, 0.1])
    labels = np.array([True, False, True, False])
    res = tar_at_far(scores, labels, [0.0, 0.49, 0.5])
    # FAR 0 cannot take the positive at 0.8 without its tied negative.
    assert res == {0.0: 0.5, 0.49: 0.5, 0.5: 1.0}
    assert threshold_at_far(scores, labels, 0.0) == 0.9
    assert threshold_at_far(scores, labels, 0.5) == 0.8


def test_far_below_one_over_negatives_reports_zero_false_accept_point() -> None:
    rng = np.random.default_rng(3)
    labels = rng.random(400) < 0.5
    scores = rng.normal(size=400) + 2.0 * labels
    n_neg = int((~labels).sum())
    assert min_resolvable_far(labels) == 1.0 / n_neg
    expected = np.mean(scores[labels] > scores[~labels].max())
    res = tar_at_far(scores, labels, [1e-6, 0.5 / n_neg])
    assert res[1e-6] == res[0.5 / n_neg] == expected
    table = format_table({"run": (res, min_resolvable_far(labels))})
    assert "*" in table and "no false accept" in table


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="both positive and negative"):
        tar_at_far(np.ones(3), np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="differ in length"):
        roc_curve(np.ones(3), np.ones(2, dtype=bool))
    with pytest.raises(ValueError, match="NaN"):
        roc_curve(np.array([0.1, np.nan]), np.array([True, False]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tar_at_far(np.array([0.1, 0.2]), np.array([True, False]), [2.0])
