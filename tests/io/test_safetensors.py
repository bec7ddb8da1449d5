"""safetensors reading and writing: round trips against the official `safetensors` package,
the Hugging Face shard/index layout, zero-copy memory maps, and corrupt files.

Files for the corruption tests are built byte by byte here (not by jmerge's writer)."""

import itertools
import json
import math
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.flax
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import jmerge.io as jio

BF16 = np.dtype(ml_dtypes.bfloat16)
_CODES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    BF16: "BF16",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "model": {
            "embed": {"weight": rng.normal(size=(10, 4)).astype(BF16)},
            "layers": {
                str(i): {
                    "up": {"weight": rng.normal(size=(4, 8)).astype(np.float16)},
                    "down": {"weight": rng.normal(size=(8, 4)).astype(np.float32)},
                    "steps": np.arange(3, dtype=np.int64) + i,
                }
                for i in range(3)
            },
        }
    }


def _raw_file(path, header, data: bytes, pad=True):
    """A safetensors file from a header dict and data bytes, as the format spec says."""
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def _memmap_base(x):
    while x is not None and not isinstance(x, np.memmap):
        x = x.base
    return x


def test_round_trip_single_file_and_official_loader(tmp_path):
    params = _params()
    out = jio.save_safetensors(params, tmp_path / "m")
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    flat = jio.flatten(params)
    # the official reader: NumPy for every dtype, Flax for bf16
    official = safetensors.numpy.load_file(str(out / "model.safetensors"))
    assert official.keys() == flat.keys()
    for n, x in flat.items():
        assert official[n].dtype == x.dtype and np.array_equal(official[n], x), n
    fl = safetensors.flax.load_file(str(out / "model.safetensors"))
    assert fl["model.embed.weight"].dtype == jnp.bfloat16
    with safetensors.safe_open(str(out / "model.safetensors"), framework="flax") as f:
        assert f.metadata() == {"format": "pt"}
    back = jio.load_safetensors(out)
    for n, x in jio.flatten(back).items():
        assert x.dtype == flat[n].dtype and np.array_equal(x, flat[n]), n


def test_reads_official_writer_output(tmp_path):
    flat = jio.flatten(_params(1))
    path = tmp_path / "x.safetensors"
    safetensors.numpy.save_file(flat, str(path), metadata={"k": "v"})
    ckpt = jio.SafetensorsCheckpoint(path)
    assert set(ckpt.names) == set(flat) and ckpt.metadata == {"k": "v"}
    for n, x in flat.items():
        assert ckpt.dtype(n) == x.dtype and ckpt.shape(n) == x.shape
        assert ckpt.nbytes(n) == x.nbytes and np.array_equal(ckpt.get(n), x)


def test_get_is_a_read_only_memmap_view(tmp_path):
    out = jio.save_safetensors(_params(), tmp_path / "m")
    ckpt = jio.SafetensorsCheckpoint(out)
    x = ckpt.get("model.layers.0.down.weight")
    mm = _memmap_base(x)
    assert isinstance(mm, np.memmap) and np.shares_memory(x, mm)
    assert not x.flags.writeable
    with pytest.raises(ValueError):
        x[0, 0] = 1.0
    # tensors are aligned to their itemsize in the file (largest dtypes first)
    for n in ckpt.names:
        y = ckpt.get(n)
        assert y.ctypes.data % y.dtype.itemsize == 0, n


def _shards_reference(sizes, max_bytes):
    """Hugging Face's rule, restated: greedy in order; an oversized tensor gets its own shard."""
    shards, cur, size = [], [], 0
    for i, s in enumerate(sizes):
        if cur and size + s > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += s
    return shards + [cur]


def test_sharded_layout_matches_hugging_face(tmp_path):
    params = _params()
    flat = jio.flatten(params)
    max_bytes = 150
    out = jio.save_safetensors(params, tmp_path / "m", max_shard_size=max_bytes)
    groups = _shards_reference([x.nbytes for x in flat.values()], max_bytes)
    n = len(groups)
    assert n > 2
    names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(os.listdir(out)) == sorted([*names, "model.safetensors.index.json"])
    text = (out / "model.safetensors.index.json").read_text()
    names_of = list(flat)
    want = {
        "metadata": {"total_size": sum(x.nbytes for x in flat.values())},
        "weight_map": {names_of[i]: names[k] for k, g in enumerate(groups) for i in g},
    }
    assert text == json.dumps(want, indent=2, sort_keys=True) + "\n"
    for k, g in enumerate(groups):
        loaded = safetensors.numpy.load_file(str(out / names[k]))
        assert set(loaded) == {names_of[i] for i in g}
    back = jio.load_safetensors(out, nested=False)
    assert all(np.array_equal(back[k], v) for k, v in flat.items())
    # the index file itself, and the index found in a directory with another stem
    assert jio.SafetensorsCheckpoint(out / "model.safetensors.index.json").names == tuple(
        jio.SafetensorsCheckpoint(out).names
    )


@pytest.mark.parametrize(
    ("size", "want"),
    [(123, 123), ("500MB", 500 * 10**6), ("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("1.5kb", 1500)],
)
def test_parse_size(size, want):
    assert jio.parse_size(size) == want


@pytest.mark.parametrize("bad", ["5 parsecs", "GB", 0, -1, "1.2.3MB", None])
def test_parse_size_errors(bad):
    with pytest.raises(ValueError, match="max_shard_size"):
        jio.parse_size(bad)


_DT = st.sampled_from(list(_CODES))


@settings(max_examples=20, deadline=None)
@given(
    st.lists(
        st.tuples(_DT, st.lists(st.integers(0, 5), min_size=0, max_size=3)), min_size=1, max_size=6
    ),
    st.integers(1, 200),
    st.booleans(),
)
def test_writer_round_trip_property(tmp_path_factory, tensors, max_bytes, planned):
    rng = np.random.default_rng(0)
    flat = {
        f"t{i}.w": rng.normal(size=shape).astype(dt) if dt != np.bool_ else rng.random(shape) > 0.5
        for i, (dt, shape) in enumerate(tensors)
    }
    out = tmp_path_factory.mktemp("w") / "ckpt"
    plan = [(n, x.shape, x.dtype) for n, x in flat.items()] if planned else None
    with jio.ShardedWriter(out, plan=plan, max_shard_size=max_bytes) as w:
        for n in reversed(list(flat)) if planned else flat:  # a plan allows any order
            w.add(n, flat[n])
    groups = _shards_reference([x.nbytes for x in flat.values()], max_bytes)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) == len(groups)
    official = {}
    for f in files:
        official.update(safetensors.numpy.load_file(str(out / f)))
    assert official.keys() == flat.keys()
    ckpt = jio.SafetensorsCheckpoint(out)
    for n, x in flat.items():
        assert official[n].dtype == x.dtype and np.array_equal(official[n], x)
        assert np.array_equal(ckpt.get(n), x) and ckpt.get(n).dtype == x.dtype


def test_early_writeback_keeps_bytes(tmp_path, monkeypatch):
    """Every tensor written starts its writeback (sync_file_range on Linux) before the
    flush-and-fsync at the end; written out of order into a planned shard, the file still
    equals what the official loader reads back."""
    from jmerge.io import safetensors as st_mod

    monkeypatch.setattr(st_mod, "_WRITEBACK_MIN", 0)
    rng = np.random.default_rng(1)
    flat = {f"t{i}": rng.normal(size=(64, 7 + i)).astype(np.float32) for i in range(5)}
    out = tmp_path / "ckpt"
    plan = [(n, x.shape, x.dtype) for n, x in flat.items()]
    with jio.ShardedWriter(out, plan=plan, max_shard_size=4000) as w:
        for n in reversed(list(flat)):
            w.add(n, flat[n])
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(safetensors.numpy.load_file(str(f)))
    assert got.keys() == flat.keys()
    for n, x in flat.items():
        np.testing.assert_array_equal(got[n], x)


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 20000), min_size=1, max_size=7),
    order_seed=st.integers(0, 2**16),
)
def test_direct_io_shard_any_order(tmp_path_factory, sizes, order_seed):
    """Shards written with O_DIRECT (the threshold lowered so that small files use it):
    tensors of odd byte sizes, added in a random order, so pieces start and end inside blocks
    that other tensors complete; the official loader reads back every byte."""
    from jmerge.io import safetensors as st_mod

    out = tmp_path_factory.mktemp("d") / "ckpt"
    probe = out.parent / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0)))
    except OSError:
        pytest.skip("no O_DIRECT on this filesystem")
    rng = np.random.default_rng(order_seed)
    flat = {f"t{i}": rng.integers(0, 255, size=n).astype(np.uint8) if i % 2 else
            rng.normal(size=n // 2 + 1).astype(BF16) for i, n in enumerate(sizes)}
    plan = [(n, x.shape, x.dtype) for n, x in flat.items()]
    old = st_mod._DIRECT_CHUNK
    st_mod._DIRECT_CHUNK = 8192
    used = []
    real_open = st_mod._DirectFile.open.__func__

    def spy(cls, path, size):
        f = real_open(cls, path, size)
        used.append(f is not None or size < 8192)
        return f

    st_mod._DirectFile.open = classmethod(spy)
    try:
        with jio.ShardedWriter(out, plan=plan, max_shard_size=30000) as w:
            for n in rng.permutation(list(flat)):
                w.add(str(n), flat[str(n)])
    finally:
        st_mod._DIRECT_CHUNK = old
        st_mod._DirectFile.open = classmethod(real_open)
    assert used and all(used)
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(safetensors.numpy.load_file(str(f)))
    assert got.keys() == flat.keys()
    for n, x in flat.items():
        np.testing.assert_array_equal(got[n].view(np.uint8), x.view(np.uint8))


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6000), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    direct=st.booleans(),
)
def test_add_part_streams_tensors_in_pieces(tmp_path_factory, sizes, seed, direct):
    """Tensors written in random pieces with add_part, the tensors interleaved at random
    (through O_DIRECT with the threshold lowered, or the page cache): the official loader reads
    back every byte, and float32 pieces are rounded to the planned bf16 as a whole tensor is."""
    from jmerge.io import safetensors as st_mod

    out = tmp_path_factory.mktemp("p") / "ckpt"
    rng = np.random.default_rng(seed)
    flat = {f"t{i}": rng.normal(size=(n,)).astype(np.float32) for i, n in enumerate(sizes)}
    plan = [(n, (x.size,), BF16 if i % 2 else np.float32)
            for i, (n, x) in enumerate(flat.items())]
    cuts = {n: sorted({0, x.size, *rng.integers(0, x.size, size=3).tolist()})
            for n, x in flat.items()}
    # each tensor's parts, in order
    left = {n: list(itertools.pairwise(c)) for n, c in cuts.items()}
    mixed = []
    while left:
        n = sorted(left)[rng.integers(len(left))]  # the tensors interleaved at random
        mixed.append((n, *left[n].pop(0)))
        if not left[n]:
            del left[n]
    old = st_mod._DIRECT_CHUNK
    st_mod._DIRECT_CHUNK = 8192 if direct else old
    try:
        with jio.ShardedWriter(out, plan=plan, max_shard_size=20000) as w:
            for n, a, b in mixed:
                w.add_part(n, a, flat[n][a:b])
    finally:
        st_mod._DIRECT_CHUNK = old
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(safetensors.numpy.load_file(str(f)))
    assert got.keys() == flat.keys()
    for (n, x), (_, _, dtype) in zip(flat.items(), plan, strict=True):
        np.testing.assert_array_equal(got[n].view(np.uint8), x.astype(dtype).view(np.uint8))


def test_add_part_errors(tmp_path):
    plan = [("a", (2, 3), BF16), ("n", (4,), np.int32)]
    with jio.ShardedWriter(tmp_path / "o", plan=plan) as w:
        with pytest.raises(ValueError, match="'a': a part of entries \\[2, 4\\); expected one "
                                             "starting at 0 and ending by 6"):
            w.add_part("a", 2, np.zeros(2, np.float32))
        w.add_part("a", 0, np.zeros(4, np.float32))
        with pytest.raises(ValueError, match="'a': a part of entries \\[4, 7\\)"):
            w.add_part("a", 4, np.zeros(3, np.float32))  # runs past the end
        with pytest.raises(ValueError, match="'a': 4 of 6 entries were added with add_part"):
            w.add("a", np.zeros((2, 3), np.float32))
        with pytest.raises(ValueError, match="'n' has dtype float32, planned int32"):
            w.add_part("n", 0, np.zeros(4, np.float32))
        with pytest.raises(ValueError, match="'zz' is not in the plan"):
            w.add_part("zz", 0, np.zeros(1))
        w.add_part("a", 4, np.ones(2, np.float32))
        with pytest.raises(ValueError, match="'a' was already added"):
            w.add_part("a", 6, np.zeros(0, np.float32))
        w.add_part("n", 0, np.arange(4, dtype=np.int32))
    ckpt = jio.SafetensorsCheckpoint(tmp_path / "o")
    np.testing.assert_array_equal(np.asarray(ckpt.get("a"), np.float32),
                                  [[0, 0, 0], [0, 1, 1]])
    np.testing.assert_array_equal(ckpt.get("n"), np.arange(4))
    with (jio.ShardedWriter(tmp_path / "free") as w,
          pytest.raises(ValueError, match="add_part needs a plan")):
        w.add_part("a", 0, np.zeros(1))


def test_add_part_incomplete_tensor_commits_nothing(tmp_path):
    with pytest.raises(jio.CheckpointError, match="never added: 'a'"), \
            jio.ShardedWriter(tmp_path / "o", plan=[("a", (5,), np.float32)]) as w:
        w.add_part("a", 0, np.zeros(3, np.float32))
    assert not (tmp_path / "o").exists()


def test_direct_io_falls_back_when_a_write_wants_another_alignment(tmp_path, monkeypatch):
    """A filesystem that accepts O_DIRECT at open but rejects the writes (EINVAL, e.g. a
    larger block size): the shard is finished through the page cache, every byte right.
    The rejection is simulated (os.pwrite raises EINVAL on the O_DIRECT descriptor)."""
    import errno

    from jmerge.io import safetensors as st_mod

    probe = tmp_path / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0)))
    except OSError:
        pytest.skip("no O_DIRECT on this filesystem")
    monkeypatch.setattr(st_mod, "_DIRECT_CHUNK", 8192)
    real = os.pwrite
    direct_fds = set()
    real_open = st_mod._DirectFile.open.__func__

    def spy_open(cls, path, size):
        f = real_open(cls, path, size)
        if f is not None:
            direct_fds.add(f.fd)
        return f

    def pwrite(fd, data, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(st_mod._DirectFile, "open", classmethod(spy_open))
    monkeypatch.setattr(os, "pwrite", pwrite)
    rng = np.random.default_rng(2)
    flat = {f"t{i}": rng.normal(size=3001 + 7 * i).astype(np.float32) for i in range(4)}
    out = tmp_path / "ckpt"
    with jio.ShardedWriter(out, plan=[(n, x.shape, x.dtype) for n, x in flat.items()]) as w:
        for n in reversed(list(flat)):
            w.add(n, flat[n])
    assert direct_fds  # the O_DIRECT path was taken, then left
    got = safetensors.numpy.load_file(str(out / "model.safetensors"))
    for n, x in flat.items():
        np.testing.assert_array_equal(got[n], x)


def test_writer_casts_floats_and_checks_plan(tmp_path):
    plan = [("a", (2, 3), BF16), ("n", (2,), np.int32)]
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    with jio.ShardedWriter(tmp_path / "o", plan=plan) as w:
        with pytest.raises(ValueError, match="'a' has shape"):
            w.add("a", np.zeros((3, 2), np.float32))
        with pytest.raises(ValueError, match="'zz' is not in the plan"):
            w.add("zz", x)
        with pytest.raises(ValueError, match="'n' has dtype float32, planned int32"):
            w.add("n", np.zeros(2, np.float32))
        w.add("a", jnp.asarray(x))  # float32 jax array -> bf16 on disk (round to nearest)
        w.add("n", np.array([1, 2], np.int32))
        w.copy_in(_raw_file(tmp_path / "config.json", {}, b""), "config.json")
    ckpt = jio.SafetensorsCheckpoint(tmp_path / "o")
    assert ckpt.dtype("a") == BF16 and np.array_equal(ckpt.get("a"), x.astype(BF16))
    assert (tmp_path / "o" / "config.json").exists()


def test_writer_missing_tensor_commits_nothing(tmp_path):
    with pytest.raises(jio.CheckpointError, match="never added: 'b'"):
        plan = [("a", (1,), np.float32), ("b", (1,), BF16)]
        with jio.ShardedWriter(tmp_path / "o", plan=plan) as w:
            w.add("a", np.ones(1, np.float32))
    assert os.listdir(tmp_path) == []


def test_overwrite(tmp_path):
    jio.save_safetensors({"a": np.zeros(2, np.float32)}, tmp_path / "o")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jio.save_safetensors({"a": np.ones(2, np.float32)}, tmp_path / "o")
    jio.save_safetensors({"b": np.ones(3, np.float32)}, tmp_path / "o", overwrite=True)
    assert jio.SafetensorsCheckpoint(tmp_path / "o").names == ("b",)
    assert os.listdir(tmp_path) == ["o"]  # no staging or old directory left
    f = jio.save_safetensors({"a": np.zeros(2, np.float32)}, tmp_path / "f.safetensors")
    with pytest.raises(FileExistsError):
        jio.save_safetensors({"a": np.zeros(2, np.float32)}, f)


def test_load_options(tmp_path):
    out = jio.save_safetensors(_params(), tmp_path / "m")
    back = jio.load_safetensors(out, dtype=np.float32, copy=True)
    w = back["model"]["embed"]["weight"]
    assert w.dtype == np.float32 and w.flags.writeable
    assert back["model"]["layers"]["0"]["steps"].dtype == np.int64  # ints are not cast
    like = _params()
    assert jio.load_safetensors(out, like=like).keys() == like.keys()


# ------------------------------------------------------------------------------ corrupt files


def _good(tmp_path):
    a = np.arange(16, dtype=np.float32).reshape(4, 4)
    c = np.arange(3, dtype=np.int32)
    b = np.ones(3, BF16)
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
        "c": {"dtype": "I32", "shape": [3], "data_offsets": [64, 76]},
        "b": {"dtype": "BF16", "shape": [3], "data_offsets": [76, 82]},
    }
    data = a.tobytes() + c.tobytes() + b.tobytes()
    return header, data


def test_hand_built_file_reads(tmp_path):
    header, data = _good(tmp_path)
    p = _raw_file(tmp_path / "good.safetensors", header, data)
    ckpt = jio.SafetensorsCheckpoint(p)
    assert ckpt.names == ("a", "c", "b")
    assert np.array_equal(ckpt.get("b"), np.ones(3, BF16))
    assert safetensors.numpy.load_file(str(p)).keys() == {"a", "b", "c"}


def _corrupt(header, data, case):
    h = json.loads(json.dumps(header))
    if case == "unknown dtype":
        h["c"]["dtype"] = "F4"
        return h, data, "'c'.*unknown or unsupported dtype 'F4'"
    if case == "offsets past the data":
        h["b"]["data_offsets"] = [76, 82 + 2]
        return h, data, "'b'.*hold 8 bytes.*needs 6"
    if case == "overlap":
        h["c"]["data_offsets"] = [60, 72]
        return h, data, "'c'.*overlaps tensor 'a'"
    if case == "gap":
        h["b"]["data_offsets"] = [78, 84]
        return h, data + b"\0\0", "before tensor 'b'.*belong to no tensor"
    if case == "nbytes":
        h["a"]["shape"] = [4, 5]
        return h, data, r"'a'.*hold 64 bytes, but shape \(4, 5\) of F32 needs 80"
    if case == "trailing bytes":
        return h, data + b"\0" * 8, "after the last tensor 'b'"
    if case == "bad shape":
        h["a"]["shape"] = [4, -4]
        return h, data, "'a' has an invalid shape"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    ["unknown dtype", "offsets past the data", "overlap", "gap", "nbytes", "trailing bytes",
     "bad shape"],
)
def test_corrupt_header_names_file_and_tensor(tmp_path, case):
    header, data = _good(tmp_path)
    h, d, pattern = _corrupt(header, data, case)
    p = _raw_file(tmp_path / "bad-file.safetensors", h, d)
    with pytest.raises(jio.CheckpointError, match="bad-file.safetensors.*" + pattern):
        jio.SafetensorsCheckpoint(p)


def test_truncated_file_names_file_and_tensor(tmp_path):
    header, data = _good(tmp_path)
    p = _raw_file(tmp_path / "t.safetensors", header, data)
    size = p.stat().st_size
    for cut, pattern in [
        (3, "'b' needs bytes up to"),  # last tensor in the data region
        (6 + 3, "'c' needs bytes up to"),  # all of b and the end of c
        (size - 4, "shorter than the 8-byte header length"),
        (size - 20, "header length .* runs past the end"),
    ]:
        with open(p, "r+b") as f:
            f.truncate(size - cut)
        with pytest.raises(jio.CheckpointError, match=r"t\.safetensors.*" + pattern):
            jio.load_safetensors(p)
        _raw_file(p, header, data)


def test_flipped_header_bytes(tmp_path):
    header, data = _good(tmp_path)
    p = _raw_file(tmp_path / "f.safetensors", header, data)
    raw = bytearray(p.read_bytes())
    raw[8] ^= 0xFF  # the opening brace of the JSON
    p.write_bytes(bytes(raw))
    with pytest.raises(jio.CheckpointError, match=r"f\.safetensors.*not valid UTF-8 JSON"):
        jio.SafetensorsCheckpoint(p)
    raw = bytearray(_raw_file(p, header, data).read_bytes())
    raw[7] = 0x7F  # a header length far beyond the file
    p.write_bytes(bytes(raw))
    with pytest.raises(jio.CheckpointError, match=r"f\.safetensors: header length"):
        jio.SafetensorsCheckpoint(p)


def test_inconsistent_index(tmp_path):
    out = jio.save_safetensors(_params(), tmp_path / "m", max_shard_size=250)
    index = out / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    first = sorted(set(good["weight_map"].values()))[0]
    os.rename(out / first, tmp_path / "moved")
    with pytest.raises(jio.CheckpointError, match=f"shard file {first} .*does not exist"):
        jio.SafetensorsCheckpoint(out)
    os.rename(tmp_path / "moved", out / first)
    bad = json.loads(json.dumps(good))
    in_first = [n for n, f in bad["weight_map"].items() if f == first]
    assert len(in_first) > 1
    name = in_first[0]
    bad["weight_map"][name] = sorted(set(good["weight_map"].values()))[1]
    index.write_text(json.dumps(bad))
    with pytest.raises(jio.CheckpointError, match=f"maps tensor '{name}'"):
        jio.SafetensorsCheckpoint(out)
    del bad["weight_map"][name]
    index.write_text(json.dumps(bad))
    with pytest.raises(jio.CheckpointError, match=f"does not list the tensors '{name}'"):
        jio.SafetensorsCheckpoint(out)
    index.write_text("{not json")
    with pytest.raises(jio.CheckpointError, match="index.json: not valid JSON"):
        jio.SafetensorsCheckpoint(out)


def test_empty_and_zero_size_tensors(tmp_path):
    flat = {"e": np.zeros((0, 3), np.float32), "s": np.float32(2.5), "z": np.zeros(0, BF16)}
    p = jio.save_safetensors(flat, tmp_path / "z.safetensors")
    official = safetensors.numpy.load_file(str(p))
    ckpt = jio.SafetensorsCheckpoint(p)
    for n, x in flat.items():
        assert ckpt.shape(n) == np.shape(x) == official[n].shape
        assert np.array_equal(ckpt.get(n), x)
    assert math.prod(ckpt.shape("e")) == 0
