"""Streaming file merges (jmerge.io.streaming) and the `jmerge merge` command line.

References are independent: numpy arithmetic on the loaded checkpoints (task arithmetic with a
layer gradient, linear), and jmerge's in-memory merges of the whole model for the principled
methods read from curvature files.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import yaml

import jmerge
from jmerge.cli import main as cli_main
from jmerge.config import ConfigError
from jmerge.examples.checkpoints import SMALL, LlamaShape, write_family, write_llama
from jmerge.io import (
    SafetensorsCheckpoint,
    flatten,
    load_safetensors,
    save_curvature,
    save_safetensors,
)
from jmerge.io.streaming import merge_checkpoints, plan_merge

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base, fts = write_family(root, SMALL, num_models=3, max_shard_size="150KB")
    return root, base, fts


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _f32(ckpt, name):
    return np.asarray(ckpt.get(name), np.float32)


@pytest.mark.parametrize("chunk", [None, 2048])
def test_task_arithmetic_with_layer_gradient_matches_numpy(family, tmp_path, monkeypatch, chunk):
    """Also with 2048-entry chunks, so that the reader thread (streaming._ChunkFeed) runs
    ahead across chunk and tensor boundaries and its buffer sets are reused many times."""
    from jmerge.io import streaming

    if chunk is not None:
        monkeypatch.setattr(streaming, "_CHUNK", chunk)
    root, base, fts = family
    cfg = _write(tmp_path / "ta.yaml", {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(fts[0]), "parameters": {"weight": 0.5}},
            {"model": str(fts[1]), "parameters": {"weight": [0.0, 1.0]}},
            {"model": str(fts[2]), "parameters": {
                "weight": [{"filter": "mlp", "value": 0.25}, {"value": 0.1}]}},
        ],
    })
    summary = merge_checkpoints(cfg, tmp_path / "out", progress=False, max_shard_size="100KB")
    out = SafetensorsCheckpoint(tmp_path / "out")
    b = SafetensorsCheckpoint(base)
    f = [SafetensorsCheckpoint(p) for p in fts]
    assert out.names == b.names and summary.tensors == len(b.names)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()  # sharded output
    assert len(out.files) > 1
    for name in b.names:
        layer = re.search(r"layers\.(\d+)\.", name)
        t = 0.0 if layer is None else int(layer.group(1)) / (SMALL.layers - 1)
        w = [0.5, t, 0.25 if "mlp" in name else 0.1]
        expected = _f32(b, name) + sum(
            wi * (_f32(fi, name) - _f32(b, name)) for wi, fi in zip(w, f, strict=True))
        assert out.dtype(name) == BF16
        np.testing.assert_allclose(_f32(out, name), expected, rtol=2 ** -7, atol=1e-6,
                                   err_msg=name)


def test_linear_output_dtype_config_and_tokenizer_files(family, tmp_path):
    root, base, fts = family
    cfg = _write(tmp_path / "lin.yaml", {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": w}}
                   for p, w in zip(fts, (1.0, 2.0, 1.0), strict=True)],
        "out_dtype": "float32",
    })
    merge_checkpoints(cfg, tmp_path / "out", progress=False)
    out = SafetensorsCheckpoint(tmp_path / "out")
    f = [SafetensorsCheckpoint(p) for p in fts]
    for name in out.names:
        # mergekit's rule: the result has the inputs' dtype (bf16), then out_dtype is applied.
        expected = (_f32(f[0], name) + 2 * _f32(f[1], name) + _f32(f[2], name)) / 4
        expected = expected.astype(BF16).astype(np.float32)
        assert out.dtype(name) == np.float32
        np.testing.assert_allclose(_f32(out, name), expected, rtol=2 ** -8, atol=1e-7)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["num_hidden_layers"] == SMALL.layers
    for name in ("tokenizer.json", "tokenizer_config.json"):  # donor: the first model
        assert (tmp_path / "out" / name).read_bytes() == (fts[0] / name).read_bytes()


def test_random_methods_are_reproducible_and_seeded(family, tmp_path):
    root, base, fts = family
    cfg = _write(tmp_path / "dare.yaml", {
        "merge_method": "dare_ties", "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.5}}
                   for p in fts],
    })
    a = load_safetensors(merge_checkpoints(cfg, tmp_path / "a", progress=False).out,
                         nested=False)
    b = load_safetensors(merge_checkpoints(cfg, tmp_path / "b", progress=False).out,
                         nested=False)
    c = load_safetensors(merge_checkpoints(cfg, tmp_path / "c", progress=False, seed=1).out,
                         nested=False)
    name = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a[name], c[name])


def test_dry_run_writes_nothing(family, tmp_path):
    root, base, fts = family
    cfg = _write(tmp_path / "ties.yaml", {
        "merge_method": "ties", "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.3}}
                   for p in fts],
    })
    s = merge_checkpoints(cfg, tmp_path / "out", dry_run=True, progress=False)
    assert s.dry_run and s.tensors == len(SafetensorsCheckpoint(base).names)
    assert s.bytes_written == 0 and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing written


def _ta(base, models):
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in models]}


def test_missing_model_directory(family, tmp_path):
    root, base, fts = family
    cfg = _write(tmp_path / "c.yaml", _ta(base, [fts[0], tmp_path / "nope"]))
    with pytest.raises(FileNotFoundError, match="nope"):
        merge_checkpoints(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_tensor_and_shapes(family, tmp_path):
    root, base, fts = family
    other = write_llama(tmp_path / "big_vocab", SMALL._replace(vocab=160), seed=7)
    cfg = _write(tmp_path / "c.yaml", _ta(base, [fts[0], other]))
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight.*\(128, 64\).*\(160, 64\)"):
        merge_checkpoints(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_named(family, tmp_path):
    root, base, fts = family
    flat = load_safetensors(fts[0], nested=False)
    del flat["model.layers.1.mlp.down_proj.weight"]
    save_safetensors(flat, tmp_path / "partial")
    cfg = _write(tmp_path / "c.yaml", _ta(base, [tmp_path / "partial"]))
    with pytest.raises(KeyError, match="model.layers.1.mlp.down_proj.weight"):
        merge_checkpoints(cfg, tmp_path / "out", progress=False)


def test_unknown_method_and_key_list_allowed(family, tmp_path):
    root, base, fts = family
    bad = _ta(base, fts[:1]) | {"merge_method": "tie"}
    with pytest.raises(ConfigError, match=r"'tie'.*task_arithmetic"):
        merge_checkpoints(_write(tmp_path / "a.yaml", bad), tmp_path / "out", progress=False)
    bad = _ta(base, fts[:1]) | {"merge_methd": "ties"}
    with pytest.raises(ConfigError, match=r"merge_methd.*merge_method"):
        merge_checkpoints(_write(tmp_path / "b.yaml", bad), tmp_path / "out", progress=False)


@pytest.mark.parametrize("tie", [True, False])
def test_tied_lm_head_follows_config(family, tmp_path, tie):
    root, base, fts = family
    tied = write_llama(tmp_path / "tied", SMALL._replace(tie_word_embeddings=True),
                       seed=5, base=None)
    if not tie:  # same files, but the config says the head is not tied: reject by name
        cfg_path = tied / "config.json"
        c = json.loads(cfg_path.read_text())
        c["tie_word_embeddings"] = False
        cfg_path.write_text(json.dumps(c))
    cfg = _write(tmp_path / "c.yaml", _ta(base, [fts[0], tied]))
    if not tie:
        with pytest.raises(ValueError, match="lm_head.weight.*tie_word_embeddings"):
            merge_checkpoints(cfg, tmp_path / "out", progress=False)
        return
    merge_checkpoints(cfg, tmp_path / "out", progress=False)
    out, b = SafetensorsCheckpoint(tmp_path / "out"), SafetensorsCheckpoint(base)
    t, f0 = SafetensorsCheckpoint(tied), SafetensorsCheckpoint(fts[0])
    expected = (_f32(b, "lm_head.weight")
                + 0.5 * (_f32(f0, "lm_head.weight") - _f32(b, "lm_head.weight"))
                + 0.5 * (_f32(t, "model.embed_tokens.weight") - _f32(b, "lm_head.weight")))
    np.testing.assert_allclose(_f32(out, "lm_head.weight"), expected, rtol=2 ** -7, atol=1e-6)


def test_untied_model_against_tied_donor_is_rejected(family, tmp_path):
    root, base, fts = family
    tied = write_llama(tmp_path / "tied", SMALL._replace(tie_word_embeddings=True), seed=5)
    cfg = _write(tmp_path / "c.yaml", _ta(tied, [fts[0]]))
    with pytest.raises(ValueError, match=r"stores its own 'lm_head.weight'"):
        merge_checkpoints(cfg, tmp_path / "out", progress=False)


# ---------------------------------------------------------------------------------------------
# Principled merges from curvature files equal the in-memory merges


@pytest.fixture(scope="module")
def flax_family(tmp_path_factory):
    """A small tree saved as safetensors, three fine-tuned variants with Fishers and Grams."""
    root = tmp_path_factory.mktemp("flax")
    rng = np.random.default_rng(0)
    theta0 = {"params": {"dense0": {"kernel": rng.normal(size=(6, 5)), "bias": rng.normal(size=5)},
                         "dense1": {"kernel": rng.normal(size=(5, 3)), "bias": np.zeros(3)}}}
    theta0 = jax.tree.map(lambda x: np.asarray(x, np.float32), theta0)
    dirs, models, fishers, grams = [], [], [], []
    for i in range(3):
        m = jax.tree.map(lambda x: x + np.float32(0.1) * rng.normal(size=x.shape).astype(
            np.float32), theta0)
        f = jax.tree.map(lambda x: rng.uniform(0.1, 2.0, size=x.shape).astype(np.float32), m)
        xs = {k: rng.normal(size=(20, m["params"][k]["kernel"].shape[0])) for k in ("dense0",
                                                                               "dense1")}
        g = jmerge.curvature.BlockGram(
            {f"['params']['{k}']['kernel']": jnp.asarray(x.T @ x, jnp.float32)
             for k, x in xs.items()})
        d = root / f"ft{i}"
        save_safetensors(flatten(m), d)
        save_curvature(f, d, kind="fisher")
        save_curvature(g, d, kind="gram")
        dirs.append(d), models.append(m), fishers.append(f), grams.append(g)
    base = root / "base"
    save_safetensors(flatten(theta0), base)
    f0 = jax.tree.map(lambda x: rng.uniform(0.1, 1.0, size=x.shape).astype(np.float32), theta0)
    save_curvature(f0, base, kind="fisher")
    return base, dirs, theta0, models, fishers, grams, f0


def _flat_close(out_dir, expected, rtol=1e-5):
    got = load_safetensors(out_dir, nested=False)
    exp = flatten(jax.tree.map(np.asarray, expected))
    assert got.keys() == exp.keys()
    for k in exp:
        np.testing.assert_allclose(np.asarray(got[k], np.float64), exp[k], rtol=rtol, atol=1e-6,
                                   err_msg=k)


def test_fisher_from_files_equals_in_memory(flax_family, tmp_path):
    base, dirs, theta0, models, fishers, grams, f0 = flax_family
    w = [0.2, 0.3, 0.5]
    cfg = {"merge_method": "fisher", "models": [
        {"model": str(d), "parameters": {"weight": wi}} for d, wi in zip(dirs, w, strict=True)]}
    merge_checkpoints(cfg, tmp_path / "out", progress=False)
    _flat_close(tmp_path / "out", jmerge.fisher_merge(models, fishers, weights=jnp.asarray(w)))


def test_regmean_from_files_equals_in_memory(flax_family, tmp_path):
    base, dirs, theta0, models, fishers, grams, f0 = flax_family
    cfg = {"merge_method": "regmean", "models": [{"model": str(d)} for d in dirs],
           "parameters": {"alpha": 0.9}}
    merge_checkpoints(cfg, tmp_path / "out", progress=False)
    _flat_close(tmp_path / "out", jmerge.regmean(models, grams, alpha=0.9), rtol=1e-4)


def test_gradient_matching_from_files_uses_base_fisher(flax_family, tmp_path):
    base, dirs, theta0, models, fishers, grams, f0 = flax_family
    cfg = {"merge_method": "gradient_matching", "base_model": str(base),
           "models": [{"model": str(d), "parameters": {"weight": 0.4}} for d in dirs]}
    merge_checkpoints(cfg, tmp_path / "out", progress=False)
    expected = jmerge.gradient_matching(theta0, models, fishers, alpha=0.4, prior=f0).params
    _flat_close(tmp_path / "out", expected)


def test_mats_from_files_equals_in_memory_with_relative_damping(flax_family, tmp_path):
    base, dirs, theta0, models, fishers, grams, f0 = flax_family
    (tmp_path / "base").mkdir()
    save_safetensors(flatten(theta0), tmp_path / "base" / "model.safetensors")
    cfg = {"merge_method": "mats", "base_model": str(tmp_path / "base"),
           "models": [{"model": str(d)} for d in dirs], "parameters": {"damping": 0.3}}
    merge_checkpoints(cfg, tmp_path / "out", progress=False)
    expected = jmerge.mats(theta0, models, fishers, damping=0.3).params
    _flat_close(tmp_path / "out", expected)


def test_mats_with_gram_files_equals_in_memory(flax_family, tmp_path):
    base, dirs, theta0, models, fishers, grams, f0 = flax_family
    cfg = {"merge_method": "mats", "base_model": str(base),
           "models": [{"model": str(d)} for d in dirs],
           "parameters": {"curvature": "gram", "damping": 0.1, "maxiter": 200, "rtol": 1e-8}}
    merge_checkpoints(cfg, tmp_path / "out", progress=False)
    # Per-tensor solves with the whole model's damping unit equal one whole-model solve: the
    # Gram curvature is block diagonal over tensors.
    expected = jmerge.mats(theta0, models, grams, damping=0.1, maxiter=200, rtol=1e-8).params
    _flat_close(tmp_path / "out", expected, rtol=1e-4)
    bad = cfg | {"parameters": {"curvature": "hessian"}}
    with pytest.raises(ConfigError, match="fisher, gram, kfac"):
        plan_merge(bad)


def test_missing_curvature_file_is_named(flax_family, tmp_path):
    base, dirs, *_ = flax_family
    cfg = {"merge_method": "regmean", "models": [{"model": str(base)}, {"model": str(dirs[0])}]}
    with pytest.raises(FileNotFoundError, match=r"gram curvature file .*base"):
        plan_merge(cfg)


# ---------------------------------------------------------------------------------------------
# Memory: one tensor at a time


def test_peak_memory_is_a_few_tensors_not_the_model(tmp_path):
    """4 checkpoints of 6 layers (about 4 x 128 MiB of bf16). A second run of the same merge
    (compiled programs cached, so what it adds is buffers) may hold about (4 inputs + 2) f32
    copies of the largest tensor (8 MiB) plus XLA temporaries, far below the 512 MiB of inputs
    that a merge loading whole models would hold."""
    shape = LlamaShape(hidden=1024, intermediate=2048, layers=6, vocab=2048, heads=8, kv_heads=8)
    base, fts = write_family(tmp_path, shape, num_models=3)
    cfg = _write(tmp_path / "lin.yaml", {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in (base, *fts)]})
    merge_checkpoints(cfg, tmp_path / "out", progress=False)
    s = merge_checkpoints(cfg, tmp_path / "out", progress=False)
    inputs = sum(f.stat().st_size for d in (base, *fts) for f in d.glob("*.safetensors"))
    added = s.peak_anon - s.baseline_anon
    assert s.bytes_read >= 0.99 * inputs > 500 * 2**20
    assert added < 0.25 * inputs, (added, inputs, s.largest_tensor)


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_merge_prints_summary(family, tmp_path, capsys):
    root, base, fts = family
    cfg = _write(tmp_path / "ta.yaml", _ta(base, fts))
    assert cli_main(["merge", str(cfg), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    for field in ("method", "tensors", "read", "written", "time", "peak memory"):
        assert field in text
    assert "task_arithmetic" in text and SafetensorsCheckpoint(tmp_path / "out").names


def test_compile_cache_only_for_the_command_or_when_asked(family, tmp_path):
    """``main()`` called in-process leaves JAX's persistent-cache setting alone (a test run
    or a notebook keeps its configuration); ``--compile-cache DIR`` stores the merge's
    programs under DIR, in a subdirectory per jax version and XLA_FLAGS."""
    root, base, fts = family
    cfg = _write(tmp_path / "ta.yaml", _ta(base, fts))
    before = jax.config.jax_compilation_cache_dir
    assert cli_main(["merge", str(cfg), "-o", str(tmp_path / "a"), "--no-progress"]) == 0
    assert jax.config.jax_compilation_cache_dir == before
    cache = tmp_path / "xla"
    proc = subprocess.run(
        [sys.executable, "-m", "jmerge.cli", "merge", str(cfg), "-o", str(tmp_path / "b"),
         "--no-progress", "--compile-cache", str(cache)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    subdirs = [p for p in cache.iterdir() if p.is_dir()]
    assert len(subdirs) == 1 and any(subdirs[0].iterdir())


@pytest.mark.parametrize("direct", [False, True])
def test_full_disk_during_merge_keeps_previous_output(family, tmp_path, direct):
    """Tensors are written by a background thread while the next one merges: a write error
    there (a file-size limit standing in for a full disk) still stops the merge with an error
    naming the file, and the previous output stays as it was, with no temporaries left; also
    with the shards written by O_DIRECT (the size threshold lowered so these small shards use
    it; where the filesystem has no O_DIRECT this repeats the buffered case)."""
    root, base, fts = family
    cfg = _write(tmp_path / "ta.yaml", _ta(base, fts))
    out = tmp_path / "out"
    assert cli_main(["merge", str(cfg), "-o", str(out), "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    limit = 64 * 1024  # bytes per file: the shards are up to 150 KB
    code = (
        "import resource, signal, sys; from jmerge.cli import main; "
        + ("import jmerge.io.safetensors as s; s._DIRECT_CHUNK = 8192; " if direct else "")
        + "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        f"sys.exit(main(['merge', {str(cfg)!r}, '-o', {str(out)!r}, '--no-progress']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0, proc.stdout
    assert "file size limit" in proc.stderr and str(out) in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties"])
def test_zero_size_scalar_and_odd_tensors(tmp_path, monkeypatch, method):
    """Tensors with no entries, a scalar and lengths that are not a multiple of the chunk are
    merged and written (each tensor exactly once) as numpy computes them, chunked or not."""
    from jmerge.io import streaming

    monkeypatch.setattr(streaming, "_CHUNK", 2048)
    rng = np.random.default_rng(0)
    shapes = {"a.empty": (0, 4), "b.odd": (3, 1701), "c.scalar": (), "d.small": (5,)}
    dirs = []
    for i in range(3):
        d = tmp_path / f"m{i}"
        save_safetensors({k: rng.normal(size=v).astype(np.float32) for k, v in shapes.items()},
                         d)
        dirs.append(d)
    params = {"weight": 0.5} | ({"density": 1.0} if "ties" in method else {})
    cfg = _write(tmp_path / "m.yaml", {
        "merge_method": method,
        "models": [{"model": str(d), "parameters": params} for d in dirs[1:]],
        "parameters": {"normalize": False} if method == "linear" else {},
    } | ({} if method == "linear" else {"base_model": str(dirs[0])}))
    merge_checkpoints(cfg, tmp_path / "out", progress=False)
    out = SafetensorsCheckpoint(tmp_path / "out")
    m = [SafetensorsCheckpoint(d) for d in dirs]
    assert sorted(out.names) == sorted(shapes)
    for name, shape in shapes.items():
        x0, *xs = (np.asarray(c.get(name), np.float64) for c in m)
        deltas = np.stack([x - x0 for x in xs])
        if method == "linear":
            want = 0.5 * sum(xs)
        elif method == "task_arithmetic":
            want = x0 + 0.5 * deltas.sum(0)
        else:  # the whole tensor at once (density 1: DARE's masks drop nothing)
            from jmerge.merges.mergekit import merge_tensor

            want = np.asarray(merge_tensor(
                method, jnp.asarray(x0, jnp.float32), jnp.asarray(np.stack(xs), jnp.float32),
                {"weight": np.full(2, 0.5), "density": np.ones(2)}, {},
                key=streaming._key_for(0, name) if method == "dare_ties" else None))
        got = np.asarray(out.get(name))
        assert got.shape == shape, name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
@pytest.mark.parametrize("chunk", [None, 2048])
@pytest.mark.parametrize("dtypes", [(BF16, np.float16, np.float32), (np.float32, BF16, np.float16)])
def test_models_stored_in_different_dtypes(tmp_path, monkeypatch, method, chunk, dtypes):
    """Base and models stored in different dtypes (mergekit casts them all): every input is
    read as its own dtype (not its bytes read as another's), chunked or not, and bf16 with
    fp16 models are stacked as float32 (NumPy has no common type for them); task arithmetic
    is checked against numpy, the others against the whole-tensor merge of the float32
    values."""
    from jmerge.io import streaming
    from jmerge.merges.mergekit import merge_tensor

    if chunk is not None:
        monkeypatch.setattr(streaming, "_CHUNK", chunk)
    rng = np.random.default_rng(1)
    dirs = []
    for i, dt in enumerate(dtypes):
        d = tmp_path / f"m{i}"
        save_safetensors({"w": rng.normal(size=(3, 2001)).astype(dt),
                          "v": rng.normal(size=(7,)).astype(dt)}, d)
        dirs.append(d)
    params = {"weight": 0.5} | ({"density": 0.6} if "ties" in method else {})
    cfg = _write(tmp_path / "m.yaml", {
        "merge_method": method, "base_model": str(dirs[0]), "dtype": "float32",
        "models": [{"model": str(d), "parameters": params} for d in dirs[1:]]})
    merge_checkpoints(cfg, tmp_path / "out", progress=False)
    out = SafetensorsCheckpoint(tmp_path / "out")
    m = [SafetensorsCheckpoint(d) for d in dirs]
    for name in ("w", "v"):
        x0, *xs = (np.asarray(c.get(name), np.float32) for c in m)
        if method == "task_arithmetic":
            want = x0 + 0.5 * ((xs[0] - x0) + (xs[1] - x0))
        else:
            want = np.asarray(merge_tensor(
                method, jnp.asarray(x0), jnp.asarray(np.stack(xs)),
                {"weight": np.full(2, 0.5), "density": np.full(2, 0.6)}, {},
                key=streaming._key_for(0, name) if method == "dare_ties" else None))
        np.testing.assert_allclose(np.asarray(out.get(name), np.float32), want, rtol=1e-5,
                                   atol=1e-6, err_msg=name)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_masked_methods_from_files_in_chunks_equal_whole_tensor_merges(
    family, tmp_path, monkeypatch, method
):
    """DELLA's masks are drawn over the whole tensor (its keep probabilities follow ranks),
    then the merge runs over the feed's chunks with the masks copied in per chunk: equal to
    the whole-tensor merge given the same masks and factors (drawn with the tensor's key
    folded with the model's index, as the file merge draws them), for tensors spanning
    several 2048-entry chunks."""
    from jmerge.io import streaming
    from jmerge.merges.mergekit import merge_tensor, sparsify_task_vector

    monkeypatch.setattr(streaming, "_CHUNK", 2048)
    root, base, fts = family
    params = {"density": 0.5, "epsilon": 0.1}
    cfg = _write(tmp_path / "m.yaml", {
        "merge_method": method, "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": w} | params}
                   for p, w in zip(fts, [0.5, 0.3, 0.2], strict=True)]})
    merge_checkpoints(cfg, tmp_path / "out", progress=False)
    out = SafetensorsCheckpoint(tmp_path / "out")
    b = SafetensorsCheckpoint(base)
    f = [SafetensorsCheckpoint(p) for p in fts]
    per_model = {"weight": np.array([0.5, 0.3, 0.2]), "density": np.full(3, 0.5),
                 "epsilon": np.full(3, 0.1)}
    checked = 0
    for name in b.names:
        if len(b.shape(name)) < 1:
            continue
        key = streaming._key_for(0, name)
        x0 = jnp.asarray(b.get(name))
        xs = [jnp.asarray(fi.get(name)) for fi in f]
        drawn = [sparsify_task_vector(method, x0, x, {k: v[i] for k, v in per_model.items()},
                                      {}, key=jax.random.fold_in(key, i))
                 for i, x in enumerate(xs)]
        want = merge_tensor(method, x0, jnp.stack(xs), per_model, {},
                            masks=jnp.stack([m for m, _ in drawn]),
                            scales=jnp.stack([c for _, c in drawn]))
        np.testing.assert_allclose(_f32(out, name), np.asarray(want, np.float32),
                                   rtol=2 ** -7, atol=1e-6, err_msg=name)
        checked += math.prod(b.shape(name)) > 2 * 2048
    assert checked > 0


def _threads_left():
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("jmerge-")
            and t.name != "jmerge-peak-memory"]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_non_finite_result_names_tensor_and_writes_nothing(tmp_path, monkeypatch, method):
    """An Inf in the middle chunk of one model's tensor: the merge stops with an error naming
    the tensor, the previous output is left as it was, and the reader and writer threads end."""
    from jmerge.io import streaming
    from jmerge.io.safetensors import file_region

    monkeypatch.setattr(streaming, "_CHUNK", 2048)
    base, fts = write_family(tmp_path, SMALL, num_models=3)
    cfg = _write(tmp_path / "m.yaml", _ta(base, fts) | {"merge_method": method})
    out = tmp_path / "out"
    merge_checkpoints(cfg, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    ckpt = SafetensorsCheckpoint(fts[1])
    name = max(ckpt.names, key=lambda n: math.prod(ckpt.shape(n)))
    assert math.prod(ckpt.shape(name)) > 3 * 2048
    path, offset = file_region(ckpt.get(name))
    with open(path, "r+b") as f:
        f.seek(offset + 2 * (2048 + 5))  # bf16 entry 2053: the second chunk
        f.write(np.array([np.inf], BF16).tobytes())
    with pytest.raises(FloatingPointError, match=f"{re.escape(repr(name))} has NaN or Inf"):
        merge_checkpoints(cfg, out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _threads_left() == []


@pytest.mark.parametrize("off_by", [-1, 1])
def test_reader_schedule_that_disagrees_with_the_merge_is_an_error(tmp_path, monkeypatch,
                                                                     off_by):
    """The reader thread reads each tensor as many times as streaming._passes says the merge
    will; were the two to disagree (a bug), the merge stops with an error saying so (never a
    result merged from another pass's chunks), writes nothing, and the threads end."""
    from jmerge.io import streaming

    monkeypatch.setattr(streaming, "_CHUNK", 2048)
    real = streaming._passes
    monkeypatch.setattr(streaming, "_passes", lambda plan, t: max(0, real(plan, t) + off_by))
    base, fts = write_family(tmp_path, SMALL, num_models=3)
    cfg = _write(tmp_path / "m.yaml", _ta(base, fts) | {"merge_method": "ties"})
    with pytest.raises(RuntimeError, match="_passes and the merge disagree"):
        merge_checkpoints(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert _threads_left() == []


def test_input_truncated_during_merge_is_named(tmp_path, monkeypatch):
    """A checkpoint file cut short after the plan checked it (another process rewriting it):
    the reader thread's error reaches the caller naming the file, nothing is written, and the
    threads end."""
    from jmerge.io import streaming

    monkeypatch.setattr(streaming, "_CHUNK", 2048)
    base, fts = write_family(tmp_path, SMALL, num_models=3)
    cfg = _write(tmp_path / "ta.yaml", _ta(base, fts))
    victim = max(fts[2].glob("*.safetensors"), key=lambda p: p.stat().st_size)
    real_plan = streaming.plan_merge

    def plan_then_truncate(config):
        plan = real_plan(config)
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
        return plan

    monkeypatch.setattr(streaming, "plan_merge", plan_then_truncate)
    with pytest.raises(jmerge.io.CheckpointError, match=f"{re.escape(str(victim))}: truncated"):
        merge_checkpoints(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert _threads_left() == []


def test_ctrl_c_during_merge_exits_130_and_keeps_previous_output(family, tmp_path):
    """SIGINT delivered to a real `jmerge merge` process while the writer thread writes its
    first piece: exit status 130 with a one-line message (no traceback), the previous output
    unchanged, no staging directory left, the threads stopped (the process exits)."""
    root, base, fts = family
    cfg = _write(tmp_path / "ta.yaml", _ta(base, fts))
    out = tmp_path / "out"
    assert cli_main(["merge", str(cfg), "-o", str(out), "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = (
        "import os, signal, sys, time; from jmerge.cli import main; "
        "import jmerge.io.safetensors as s; real = s.ShardedWriter.add_part\n"
        "def add_part(self, *a):\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2); return real(self, *a)\n"
        "s.ShardedWriter.add_part = add_part\n"
        f"sys.exit(main(['merge', {str(cfg)!r}, '-o', {str(out)!r}, '--no-progress']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert "interrupted; nothing was written" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_cli_errors_exit_2_and_write_nothing(family, tmp_path, capsys):
    root, base, fts = family
    cfg = _write(tmp_path / "bad.yaml", _ta(base, fts) | {"merge_method": "tie"})
    assert cli_main(["merge", str(cfg), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unknown merge method 'tie'" in err or "'tie'" in err
    assert "nothing was written" in err and not (tmp_path / "out").exists()


def test_cli_help_lists_methods_and_parameters():
    out = subprocess.run([sys.executable, "-m", "jmerge.cli", "merge", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for method in ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties",
                   "della_linear", "slerp", "nuslerp", "model_stock", "sce", "fisher",
                   "regmean", "mats", "gradient_matching"):
        assert f"  {method}:" in out, method
    for param in ("weight", "density", "gamma", "epsilon", "lambda", "--dry-run", "--out"):
        assert param in out
    top = subprocess.run([sys.executable, "-m", "jmerge.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "merge" in top


# ------------------------------------------------------- magnitude selections read in chunks


@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float16])
@pytest.mark.parametrize("n", [1, 777, 5000])
def test_streamed_kth_equals_top_k(dtype, n):
    """The chunked radix select (histograms summed over padded chunks, one pass for 16-bit
    keys, two for float32, every model counted from the same chunk) returns lax.top_k's k-th
    largest |δ| of each model, ties included; models may ask for different numbers of ranks."""
    from jmerge.io.streaming import _streamed_kth
    from jmerge.merges._select import _from_key

    r = np.random.default_rng(n)
    base = r.normal(size=n).astype(dtype)
    models = [(base.astype(np.float32) + r.choice([0.0, 0.5, -1.0, 1e-3], n)
               * r.normal(size=n).astype(np.float32) * scale).astype(dtype)
              for scale in (1.0, 3.0)]
    size = 1024

    def pad(x, start, stop):
        return np.pad(x[start:stop], (0, size - (stop - start)))

    def chunks():
        for start in range(0, n, size):
            stop = min(start + size, n)
            yield (start, stop, jnp.asarray(pad(base, start, stop)),
                   jnp.asarray(np.stack([pad(m, start, stop) for m in models])))

    wanted = [sorted({1, max(1, n // 3), n}), [max(1, n // 2)]]
    keys = _streamed_kth(chunks, n, wanted, np.dtype(dtype))
    kd = np.dtype(f"uint{8 * np.dtype(dtype).itemsize}")
    for model, ks, found in zip(models, wanted, keys, strict=True):
        mag = np.abs(model.astype(np.float32) - base.astype(np.float32)).astype(dtype)
        got = [float(_from_key(jnp.asarray(np.array(k, kd)), dtype)) for k in found]
        top = jax.lax.top_k(jnp.asarray(mag.astype(np.float32)), n)[0]
        assert got == [float(top[k - 1]) for k in ks]


@pytest.mark.parametrize(
    "method,params,global_",
    [
        ("ties", {"density": 0.3}, {}),
        ("ties", {"density": 0.6}, {"normalize": False}),
        ("breadcrumbs", {"density": 0.4, "gamma": 0.05}, {}),
        ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1}, {"rescale": True}),
        ("dare_ties", {"density": 0.5}, {}),
        ("dare_linear", {"density": 0.3}, {"rescale": False}),
    ],
)
def test_sparsifying_methods_from_files_equal_whole_tensor_merges(
    family, tmp_path, monkeypatch, method, params, global_
):
    """TIES / breadcrumbs / DARE merged from files in chunks equal mergekit-semantics merges
    of the whole tensors in memory (jmerge.merges.mergekit.merge_tensor, which sees the whole
    tensor at once): a selection as two bounds per model from a chunked radix select, DARE's
    masks drawn per chunk from the counter-based uniforms of the tensor's key (the whole
    tensor's draws, given the same key) and its L1 factors summed over the chunks."""
    from jmerge.io import streaming
    from jmerge.merges.mergekit import merge_tensor

    monkeypatch.setattr(streaming, "_CHUNK", 2048)  # every matrix spans several chunks
    root, base, fts = family
    weights = [0.5, 0.3, 0.2]
    cfg = _write(tmp_path / "m.yaml", {
        "merge_method": method, "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": w} | params}
                   for p, w in zip(fts, weights, strict=True)],
        "parameters": global_,
    })
    merge_checkpoints(cfg, tmp_path / "out", progress=False)
    out = SafetensorsCheckpoint(tmp_path / "out")
    b = SafetensorsCheckpoint(base)
    f = [SafetensorsCheckpoint(p) for p in fts]
    per_model = {"weight": np.asarray(weights)} | {k: np.full(3, v) for k, v in params.items()}
    checked = 0
    for name in b.names:
        if len(b.shape(name)) < 1:
            continue
        key = streaming._key_for(0, name) if method.startswith("dare") else None
        want = merge_tensor(method, jnp.asarray(b.get(name)),
                            jnp.stack([jnp.asarray(fi.get(name)) for fi in f]),
                            per_model, global_, key=key)
        np.testing.assert_allclose(_f32(out, name), np.asarray(want, np.float32),
                                   rtol=2 ** -7, atol=1e-6, err_msg=name)
        checked += math.prod(b.shape(name)) > 2048
    assert checked > 0
