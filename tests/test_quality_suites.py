"""Logic of the merge-quality suites (benchmarks/quality): exactness, model selection."""

from __future__ import annotations

import json

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


# ---------------------------------------------------------------------------------------------
# digits suite, at a micro size (the logic, not the numbers)


def _micro_cfg():
    from benchmarks.quality import digits as q

    return q.QUICK._replace(
        tasks=("rot90", "parity"),
        pretrain_steps=60,
        finetune_steps=50,
        multitask_steps=50,
        curv_examples=32,
        ta_alphas=(0.3, 1.0),
        fisher_alphas=(1.0,),
        gm_alphas=(0.5, 1.0),
        gm_diag_priors=(1.0,),
        gm_mf_alphas=(1.0,),
        gm_mf_priors=(0.1,),
        gm_mf_maxiter=3,
        mats_curvatures=("diag", "gram"),
        mats_inits=("ta",),
        mats_iters=(0, 3),
        mats_dampings=(0.0,),
        mats_tr_iters=(3,),
        mats_tr_dampings=(3.0,),
        ties=((0.5, 1.0),),
        dare=((0.5, 0.5),),
        regmean_alphas=(1.0,),
    )


def test_digits_suite_micro_run_and_cache(tmp_path):
    from benchmarks.quality import digits as q

    cfg = _micro_cfg()
    r = q.run_seed("mlp", 0, cfg, tmp_path, progress=False)
    assert r.seconds["cache_hit"] == 0.0
    methods = {c.method for c in r.candidates}
    assert {
        "average",
        "task_arith",
        "ties",
        "dare",
        "fisher",
        "regmean",
        "gradmatch_diag",
        "gradmatch_mf",
        "mats_diag",
        "mats_gram",
        "mats_gram_tr",
    } <= methods
    for c in r.candidates:
        assert 0.0 <= c.val <= 2.0 and 0.0 <= c.test <= 2.0, c
    # MaTS with 0 CG iterations returns its initialisation: task arithmetic at the chosen α.
    best_a = q.best_per_method(r.candidates)["task_arith"].setting["a"]
    ta = next(c for c in r.candidates if c.method == "task_arith" and c.setting["a"] == best_a)
    m0 = next(c for c in r.candidates if c.method == "mats_gram" and c.setting["iters"] == 0)
    assert m0.test == pytest.approx(ta.test) and m0.val == pytest.approx(ta.val)
    assert 0.0 < r.tau_ratio < 1.0 and all(np.isfinite(v) for v in r.kl.values())
    text = q.summarize([r])
    for name in ("theta0", "multitask", "finetuned", "task_arith", "mats_gram"):
        assert any(line.startswith(name) for line in text.splitlines()), name
    assert len(q.claims([r])) >= 3
    # A saved seed reads back to the same report (runs split by seed are combined so).
    path = tmp_path / "seed0.json"
    path.write_text(json.dumps([q._jsonable(r)]))
    back = q._load_json(path)
    assert q.summarize(back) == text and q.claims(back) == q.claims([r])
    # The rerun restores the checkpoints (orbax) instead of training: the same scores.
    r2 = q.run_seed("mlp", 0, cfg, tmp_path, progress=False)
    assert r2.seconds["cache_hit"] == 1.0
    assert [c.test for c in r2.candidates] == pytest.approx([c.test for c in r.candidates])


def test_digits_tasks_differ_in_inputs_or_labels():
    from benchmarks.quality import digits as q

    sp = q.load_splits(0)
    assert len(q.ALL_TASKS) >= 6
    x, y = sp["train"]
    for t in q.ALL_TASKS:
        xt, yt = q.task_xy(t, x, y)
        assert xt.shape == x.shape and yt.shape == y.shape
        assert (t in q.LABEL_TASKS) == np.array_equal(xt, x)
        assert (t in q.LABEL_TASKS) != np.array_equal(yt, y)
    # The splits are disjoint and cover the data; the pool is not fine-tuning data.
    sizes = {k: v.x.shape[0] for k, v in sp.items()}
    assert sum(sizes.values()) == 1797
    xm, _ = q.pretrain_mixture(sp, q.ALL_TASKS, 0)
    assert xm.shape[0] > sizes["train"] + sizes["pool"]
