"""Tests of the digits benchmark (jmerge/examples/digits.py) and the demo (jmerge/demo.py)."""

from __future__ import annotations

import itertools
import re

import chex
import jax
import numpy as np
import pytest

from jmerge.curvature.gram import gram
from jmerge.examples import digits

QUICK = {"pretrain_steps": 150, "finetune_steps": 100}


@pytest.fixture(scope="module")
def bench() -> digits.Benchmark:
    return digits.build_benchmark(progress=False, **QUICK)


def test_views_are_deterministic_distinct_and_shape_preserving():
    data = digits.load_data()
    assert data.x_train.shape[1] == 64 and data.x_train.shape[0] + data.x_test.shape[0] == 1797
    assert len(digits.TASKS) >= 6
    x = data.x_train[:200]
    views = {t: digits.view(t, x) for t in [digits.PRETRAIN_VIEW, *digits.TASKS]}
    for t, v in views.items():
        assert v.shape == x.shape and v.dtype == np.float32, t
        np.testing.assert_array_equal(v, digits.view(t, x.copy()), err_msg=t)
    for (a, va), (b, vb) in itertools.combinations(views.items(), 2):
        assert np.mean(np.abs(va - vb)) > 0.05, f"views {a} and {b} are (almost) the same"
    # The split itself is fixed by the seed.
    np.testing.assert_array_equal(digits.load_data(0).y_test, data.y_test)
    with pytest.raises(KeyError, match="unknown digits view"):
        digits.view("rot45", x)


def test_param_layout_has_backbone_and_head():
    for name in ("mlp", "cnn"):
        model = digits.make_model(name)
        params = digits.init_params(model, seed=3)
        assert set(params["params"]) == {"backbone", "head"}
        assert params["params"]["head"]["kernel"].shape[-1] == 10
        chex.assert_trees_all_equal(params, digits.init_params(model, seed=3))
        logits = model.apply(params, np.zeros((5, 64), np.float32))
        assert logits.shape == (5, 10)


def test_head_only_training_is_a_linear_probe():
    """``head_only`` moves the head and nothing else, and lowers the task loss; the
    multitask fit starts its heads from the given probes."""
    model = digits.make_model("mlp")
    params = digits.init_params(model, seed=1)
    data = digits.load_data()
    x, y = data.x_train[:256], (data.y_train[:256] % 2).astype(np.int32)
    probe = digits.train(model, params, x, y, steps=60, lr=1e-2, progress=False, head_only=True)
    chex.assert_trees_all_equal(probe["params"]["backbone"], params["params"]["backbone"])
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), probe, params)
    assert min(jax.tree.leaves(moved["params"]["head"])) > 0
    assert digits.accuracy(model, probe, x, y) > digits.accuracy(model, params, x, y) + 0.2
    full = digits.train(model, params, x, y, steps=5, lr=1e-2, progress=False)
    assert max(jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(a - b))), full, params)["params"]["backbone"])) > 0
    heads = [probe["params"]["head"], params["params"]["head"]]
    _, got = digits.fit_multitask(
        model, params, np.stack([x, x]), np.stack([y, y]), steps=1, lr=0.0, progress=False,
        heads=heads,
    )
    chex.assert_trees_all_close(got, heads)
    with pytest.raises(ValueError, match="expected 2"):
        digits.fit_multitask(model, params, np.stack([x, x]), np.stack([y, y]), steps=1,
                             progress=False, heads=heads[:1])


def test_finetuning_beats_pretrained_on_most_views(bench):
    margin = 0.2
    gains = {t: bench.finetuned_acc[t] - bench.pretrained_acc[t] for t in bench.tasks}
    assert sum(g > margin for g in gains.values()) >= 4, gains
    # The pretrained model does solve its own (identity) view.
    _, _, x, y = digits.task_split(bench.data, digits.PRETRAIN_VIEW)
    assert digits.accuracy(bench.model, bench.pretrained, x, y) > 0.85


def test_evaluate_and_normalized_accuracy(bench):
    for t, p in zip(bench.tasks, bench.finetuned, strict=True):
        acc = digits.evaluate(bench.model, p, bench.heads, bench.data, t)
        assert acc == bench.finetuned_acc[t]
    assert bench.normalized(bench.finetuned_acc) == pytest.approx(1.0)
    mt_params, mt_heads = bench.multitask
    mt = bench.evaluate(mt_params, mt_heads)
    assert set(mt) == set(bench.tasks)
    # Joint training keeps most of every task (the upper bound is a real one).
    assert bench.normalized(mt) > 0.85


def test_merges_exclude_heads(bench):
    from jmerge.merges.basic import average, task_arithmetic
    from jmerge.merges.closed_form import fisher_merge

    p0, ft = bench.pretrained, bench.finetuned
    fishers = [jax.tree.map(lambda x: x * 0 + 1.0, p) for p in ft]
    for merged in (
        task_arithmetic(p0, ft, 0.5, exclude=r"head"),
        average(ft, pretrained=p0, exclude=r"head"),
        fisher_merge(ft, fishers, pretrained=p0, exclude=r"head"),
    ):
        chex.assert_trees_all_equal(merged["params"]["head"], p0["params"]["head"])
        diff = jax.tree.map(
            lambda a, b: float(np.max(np.abs(a - b))),
            merged["params"]["backbone"],
            p0["params"]["backbone"],
        )
        assert max(jax.tree.leaves(diff)) > 0


def test_curvature_inputs_and_grams(bench):
    x, y = digits.curvature_inputs(bench.data, "rot90", 64)
    assert x.shape == (64, 64) and y.shape == (64,)
    np.testing.assert_array_equal(x, digits.curvature_inputs(bench.data, "rot90", 64)[0])
    logits = digits.LogitsFn(bench.model)(bench.finetuned[0], x)
    assert logits.shape == (64, 10)
    assert digits.LogitsFn(bench.model) == digits.LogitsFn(digits.make_model("mlp"))
    assert np.isfinite(float(digits.LossFn(bench.model)(bench.finetuned[0], (x, y))))
    grams = gram(digits.LogitsFn(bench.model), bench.finetuned[0], x, normalize="mean").grams
    leaves = jax.tree_util.tree_leaves_with_path(bench.pretrained)
    keys = {jax.tree_util.keystr(p) for p, _ in leaves}
    assert set(grams) <= keys and len(grams) == 3  # two backbone layers and the head
    for g in grams.values():
        g = np.asarray(g)
        np.testing.assert_allclose(g, g.T, rtol=1e-5, atol=1e-6)
        assert np.linalg.eigvalsh(g.astype(np.float64)).min() > -1e-5
    # The first layer's Gram is the inputs' second moment.
    np.testing.assert_allclose(
        grams["['params']['backbone']['dense0']['kernel']"],
        np.asarray(x).T @ np.asarray(x) / 64,
        rtol=1e-4,
        atol=1e-5,
    )


METHODS = [
    "pretrained",
    "finetuned",
    "multitask",
    "average",
    "task_arith(a=0.3)",
    "task_arith(a=1.0)",
    "ties(d=0.2)",
    "dare(d=0.5,a=0.3)",
    "fisher(empirical)",
    "fisher(exact)",
    "regmean",
    "mats(gram)",
    "mats(mf,init=ta)",
    "mats(mf,init=fisher)",
    "gradmatch(diag)",
    "gradmatch(mf)",
]


def test_demo_prints_every_method(capsys):
    from jmerge.demo import main

    assert main(["--classic", "--quick", "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    num_tasks = len(header.split()) - 5  # method, <tasks>, norm, ms, ms 1st, note
    assert num_tasks == 6
    for name in METHODS:
        row = [line for line in lines if re.match(re.escape(name) + r"\*?\s", line)]
        assert len(row) == 1, f"no single row for {name}:\n{out}"
        fields = row[0].split()
        accs = [float(v) for v in fields[1 : 1 + num_tasks]]
        assert all(0.0 <= a <= 1.0 for a in accs), row[0]
        assert 0.0 <= float(fields[1 + num_tasks]) <= 1.5, row[0]
    assert sum("*" in line.split()[0] for line in lines if line.startswith("task_arith")) == 1
    assert re.search(
        r"^verdict: best merge \S+ with mean normalized accuracy [0-9.]+", out, re.MULTILINE
    )
