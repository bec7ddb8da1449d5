"""Logic of the merge-quality suites (benchmarks/quality): exactness, model selection."""

from __future__ import annotations

import chex
import numpy as np
import pytest

from benchmarks.quality import _common, exact


@pytest.fixture(scope="module")
def linear():
    return exact.make_problem("linear", num_tasks=3, dim=4, classes=2, num_examples=40, seed=1)


def _dist(a, b):
    return float(np.linalg.norm(exact._flat(a) - exact._flat(b)))


def test_exact_curvature_merges_equal_the_joint_optimum(linear):
    import jmerge

    p0, ft = linear.theta0, linear.finetuned
    c = [exact.curvature(linear, i, "exact", with_prior=False) for i in range(3)]
    gm = jmerge.gradient_matching(
        p0, ft, c, alpha=1.0, prior=jmerge.absolute(linear.prior), rtol=1e-12, maxiter=200
    )
    chex.assert_trees_all_close(gm.params, linear.joint_gm, atol=1e-6, rtol=0)
    c = [exact.curvature(linear, i, "exact", with_prior=True) for i in range(3)]
    ms = jmerge.mats(p0, ft, c, init="average", rtol=1e-12, maxiter=200)
    chex.assert_trees_all_close(ms.params, linear.joint_mats, atol=1e-6, rtol=0)
    # The two targets differ (the prior counted once vs T times), so each test can fail.
    assert _dist(linear.joint_gm, linear.joint_mats) > 1e-3


def test_joint_optima_are_stationary(linear):
    import jax

    loss, fine = exact.TaskLoss("linear"), exact.TaskLoss("linear", linear.prior)
    p0 = linear.theta0
    g = jax.grad(lambda p: sum(fine(p, (*b, p0)) for b in linear.batches))(linear.joint_mats)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g)) < 1e-9
    g = jax.grad(lambda p: sum(loss(p, (*b, p0)) for b in linear.batches))(linear.joint_gm)
    g = jax.tree.map(lambda a, x, y: a + linear.prior * (x - y), g, linear.joint_gm, p0)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g)) < 1e-9


def test_approximate_curvatures_land_between(linear):
    rows = exact.evaluate(linear)
    by = {(r.method, r.curvature): r for r in rows}
    assert by["gradient_matching", "exact"].distance < 1e-8
    assert by["mats", "exact"].distance < 1e-8
    # Diagonal curvature drops the coupling: it lands off the optimum, yet nearer than
    # task arithmetic's 1/T scaling in the objective.
    assert 1e-3 < by["mats", "diag"].excess < 1.0
    assert by["mats", "kfac"].excess <= by["mats", "diag"].excess + 1e-9


def test_selection_uses_validation_never_test():
    C = _common.Candidate
    cands = [
        C("ta", {"a": 0.3}, val=0.70, test=0.90),  # best on test, worse on validation
        C("ta", {"a": 0.5}, val=0.80, test=0.60),
        C("ta", {"a": 1.0}, val=float("nan"), test=0.99),
        C("gm", {"a": 1.0}, val=0.50, test=0.10),
    ]
    assert _common.select_by_validation(cands[:3]).setting == {"a": 0.5}
    best = _common.best_per_method(cands)
    assert list(best) == ["ta", "gm"]
    assert best["ta"].test == 0.60 and best["gm"].test == 0.10
    # Ties go to the first listed.
    assert _common.select_by_validation(
        [C("x", {"i": 0}, 0.5, 0.0), C("x", {"i": 1}, 0.5, 1.0)]
    ).setting == {"i": 0}
    with pytest.raises(ValueError):
        _common.select_by_validation([])
