"""Text suite and intermediate-task suite: corpus builder, file-level splits, the gain-share
metric, the negation rule, the loss against a NumPy reference, and the w selection."""

from __future__ import annotations

import gzip
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.quality import intermediate as im
from benchmarks.quality import text as tx
from benchmarks.quality._common import Candidate


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def fake_tree(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):
        _write(
            tmp_path / "py" / f"pkg{i % 3}" / f"m{i}.py",
            f"def f{i}():\n    return {i}\n".encode() * 20,
        )
    _write(tmp_path / "py" / "dup.py", (tmp_path / "py" / "pkg0" / "m0.py").read_bytes())
    _write(tmp_path / "py" / "empty.py", b"  \n")
    for i in range(6):
        _write(tmp_path / "lic" / f"L{i}", bytes(rng.integers(97, 123, 300, dtype=np.uint8)))
    roff = b".TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.PP\nmore text\n"
    for i in range(4):
        _write(tmp_path / "man" / "man1" / f"p{i}.1.gz", gzip.compress(roff + bytes([65 + i])))
    return tmp_path


def test_corpus_skips_missing_folders_and_reports(fake_tree):
    sources = {
        "python": [tx.Source(fake_tree / "py", "**/*.py")],
        "licences": [tx.Source(fake_tree / "nowhere", "*"), tx.Source(fake_tree / "lic", "*")],
        "man": [tx.Source(fake_tree / "man", "man?/*.gz", tx.read_man)],
        "c_headers": [tx.Source(fake_tree / "no_include", "**/*.h")],
    }
    c = tx.build_corpus(sources, bytes_per_domain=1200, shares=(0.5, 0.25, 0.25))
    assert set(c.text) == {"python", "licences", "man"}
    report = "\n".join(c.report)
    assert f"licences: {fake_tree / 'nowhere'} missing, skipped" in report
    assert f"c_headers: {fake_tree / 'no_include'} missing, skipped" in report
    assert "c_headers: no files, domain dropped" in report
    assert f"python: {fake_tree / 'py'}/**/*.py: 14 files" in report
    assert f"licences: {fake_tree / 'lic'}/*: 6 files" in report
    # quotas: test and val filled up to their share, train the rest
    assert len(c.text["python"]["test"]) >= 300 and len(c.text["python"]["val"]) >= 300
    # duplicates and blank files are never read into any split
    py_files = sum(c.files["python"].values(), [])
    assert not any(f.endswith("empty.py") for f in py_files)
    assert not (
        str(fake_tree / "py" / "dup.py") in py_files
        and str(fake_tree / "py" / "pkg0" / "m0.py") in py_files
    )


def test_corpus_split_by_file_without_overlap(fake_tree):
    sources = {
        "licences": [tx.Source(fake_tree / "lic", "*")],
        "py": [tx.Source(fake_tree / "py", "**/*.py")],
    }
    c = tx.build_corpus(sources, bytes_per_domain=1200, shares=(0.5, 0.25, 0.25), file_cap=250)
    for d in c.text:
        sets = [set(c.files[d][k]) for k in tx.SPLITS]
        assert all(sets), (d, sets)
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        for k in tx.SPLITS:  # each split's text is its files' prefixes and nothing else
            parts = [open(f, "rb").read()[:250] for f in c.files[d][k]]
            assert sum(len(p) for p in parts) >= len(c.text[d][k]) - len(parts) + 1
            for p in parts:
                assert p[:50] in c.text[d][k]
    again = tx.build_corpus(sources, bytes_per_domain=1200, shares=(0.5, 0.25, 0.25), file_cap=250)
    assert again.text == c.text  # deterministic


def test_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="no text found"):
        tx.build_corpus({"x": [tx.Source(tmp_path / "absent", "*")]}, bytes_per_domain=10)
    with pytest.raises(ValueError, match="shares"):
        tx.build_corpus({}, bytes_per_domain=10, shares=(0.5, 0.5, 0.5))


def test_read_man_strips_roff(fake_tree):
    out = tx.read_man(fake_tree / "man" / "man1" / "p0.1.gz")
    assert out == b"ls - list directory contents\nmore text\nA"


def test_gain_kept_constructed():
    pre = np.array([3.0, 2.0, 1.5, 1.0])
    ft = np.array([2.0, 1.5, 1.5, 0.5])
    merged = np.array([2.5, 1.5, 1.4, 1.25])
    got = tx.gain_kept(pre, ft, merged)
    np.testing.assert_allclose(got[[0, 1, 3]], [0.5, 1.0, -0.5])
    assert math.isnan(got[2])  # no gain to keep


def test_windows_and_loss_against_numpy():
    seqs = tx.windows(bytes(range(200)), 9)
    assert seqs.shape == (22, 9) and seqs[1, 0] == 9
    model = tx.ByteLM(d_model=16, layers=1, heads=4, max_len=8)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    z = np.asarray(model.apply(params, jnp.asarray(seqs[:, :-1])), np.float64)
    logp = (
        z
        - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - z.max(-1, keepdims=True)
    )
    ref = -np.take_along_axis(logp, seqs[:, 1:, None], -1).mean()
    np.testing.assert_allclose(tx.mean_loss(model, params, seqs), ref, rtol=1e-5)
    # causal: a later byte does not change an earlier position's logits
    x2 = seqs[:1, :-1].copy()
    x2[0, -1] = 255
    z2 = np.asarray(model.apply(params, jnp.asarray(x2)))
    np.testing.assert_allclose(z2[0, :-1], z[0, :-1], rtol=1e-4, atol=1e-5)


def test_choose_negation_rule():
    rows = [
        {"alpha": 0.5, "val_forget": 0.4, "val_control_rel": 0.01},
        {"alpha": 1.0, "val_forget": 0.9, "val_control_rel": 0.04},
        {"alpha": 2.0, "val_forget": 2.0, "val_control_rel": 0.20},
    ]
    assert tx.choose_negation(rows)["alpha"] == 1.0
    assert tx.choose_negation(rows, tolerance=0.001)["alpha"] == 0.5  # none fits: smallest α


def test_intermediate_w_chosen_on_validation_not_test():
    def cands(val, test):
        return [Candidate("fisher", {"a": 1.0}, val, test), Candidate("regmean", {}, val, test)]

    scores = {0.1: (0.9, 0.1), 0.2: (0.5, 0.99), 0.3: (0.1, 0.5), 0.5: (0.2, 0.3)}
    r = im.Result(
        "digits", 0, "accuracy", (0.8, 0.8), (0.1, 0.1), {w: cands(*s) for w, s in scores.items()}
    )
    assert im._chosen_w(r, "fisher").test == 0.1
    out = im.summarize([r])
    assert "w=0.1, a=1" in out and "0.100 ± 0.000" in out
    rl = r._replace(metric="loss")
    assert "-0.1000" in im.summarize([rl])  # scores are −loss, shown as loss


def test_intermediate_fisher_statistics():
    f_t = {"params": {"head": {"k": np.ones(3)}, "w": np.array([1.0, 0.5, 0.1, 0.0])}}
    f_i = {"params": {"head": {"k": np.full(3, 100.0)}, "w": np.array([2.0, 2.0, 2.0, 2.0])}}
    # head excluded; w·F_i > F_t at w = 0.1: coords 2 (0.2 > 0.1), 3; at 0.3: 1 (0.6 > 0.5), 2, 3
    dom = im._dominant([f_t, f_i], r"head")
    np.testing.assert_allclose(dom, [0.5, 0.5, 0.75, 0.75])
    np.testing.assert_allclose(im._trace_ratio([f_t, f_i], r"head"), 1.6 / 8.0)


def test_text_suite_micro_run_end_to_end():
    """The whole text suite at micro sizes on the machine's own text: corpus, pretraining,
    fine-tuning, curvatures, every method family, negation, the reports and the claims."""
    cfg = tx.QUICK._replace(
        bytes_per_domain=6000, pretrain_steps=20, finetune_steps=5, curv_windows=4,
        ta_alphas=(0.5,), gm_alphas=(1.0,), mats_curvatures=("diag", "gram", "fisher_mf"),
        mats_iters=(0, 2), gm_mf_maxiter=2, neg_alphas=(1.0,),
    )
    r = tx.run_seed(0, cfg, None, log=lambda s: None)
    methods = {c.method for c in r.candidates}
    assert {"average", "task_arith", "ties", "dare", "fisher", "regmean", "gradmatch_diag",
            "gradmatch_mf", "mats_diag", "mats_gram"} <= methods
    for c in r.candidates:
        assert np.isfinite(c.val) and np.isfinite(c.test), c
        assert len(c.extra["per_domain"]) == len(r.domains)
    assert len(r.loss_ft) == len(r.loss_pre) == len(r.domains)
    assert all(np.isfinite(r.loss_ft)) and all(np.isfinite(r.loss_pre))
    # MaTS with 0 CG iterations returns its initialisation (task arithmetic at the chosen α)
    m0 = [c for c in r.candidates if c.method == "mats_gram" and c.setting.get("iters") == 0]
    ta = [c for c in r.candidates if c.method == "task_arith"]
    assert m0 and ta and m0[0].test == pytest.approx(ta[0].test)
    text = tx.summarize([r])
    assert any(line.startswith("task_arith") for line in text.splitlines())
    assert set(r.negation) == set(r.domains)
    assert tx.summarize_negation([r]) and len(tx.claims([r])) >= 2
