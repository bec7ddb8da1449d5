"""Atomic writes: a writer killed with SIGKILL mid-write, or stopped by a file-size limit (a full
disk), leaves the previous complete checkpoint or nothing under the final name.

The writers run in real child processes (`subprocess`), killed for real."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import jmerge.io as jio

_WRITER = textwrap.dedent(
    """
    import signal, sys, time, resource
    import numpy as np
    from jmerge.io import ShardedWriter, save_safetensors
    out, mode, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write() fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    n, size = 50, 2**19  # 50 tensors of 2 MiB (float32)

    class Slow:  # an array that takes 10 ms to produce: the parent can kill mid-write
        shape, dtype = (size,), np.dtype(np.float32)

        def __init__(self, i):
            self.i = i

        def __array__(self, dtype=None, copy=None):
            time.sleep(0.01)
            return np.full(size, self.i + 1, np.float32)

    tensors = {f"layers.{i}.w": Slow(i) for i in range(n)}
    try:
        if mode == "dir":
            plan = [(k, (size,), np.float32) for k in tensors]
            with ShardedWriter(out, plan=plan, max_shard_size="20MB", overwrite=True) as w:
                for k, x in tensors.items():
                    w.add(k, x)
        else:
            save_safetensors(tensors, out, overwrite=True)
    except OSError as e:
        print("ERRNO", e.errno, str(e), flush=True)
        sys.exit(3)
    print("DONE", flush=True)
    """
)


def _start(out, mode, limit=0):
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(out), mode, str(limit)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _temp_bytes(parent, name):
    total = 0
    for p in parent.glob(f".{name}.tmp-*"):
        files = [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()]
        total += sum(q.stat().st_size for q in files)
    return total


def _previous(out):
    prev = {"old.a": np.arange(5, dtype=np.float32), "old.b": np.ones((2, 3), np.float16)}
    jio.save_safetensors(prev, out)
    return prev


def _assert_previous(out, prev):
    ckpt = jio.SafetensorsCheckpoint(out)
    assert ckpt.names == tuple(prev)
    for k, x in prev.items():
        assert np.array_equal(ckpt.get(k), x)


@pytest.mark.parametrize(("mode", "previous"), [("dir", True), ("dir", False), ("file", True)])
def test_sigkill_mid_write_leaves_previous_or_nothing(tmp_path, mode, previous):
    out = tmp_path / ("ckpt" if mode == "dir" else "model.safetensors")
    prev = _previous(out) if previous else None
    before = sorted(os.listdir(out)) if previous and mode == "dir" else None
    proc = _start(out, mode)
    try:
        while _temp_bytes(tmp_path, out.name) < 12 * 2**20:  # killed with 12+ of 100 MiB written
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL  # it was killed, it did not finish
    if previous:
        _assert_previous(out, prev)
        if before is not None:
            assert sorted(os.listdir(out)) == before
    else:
        assert not out.exists()
    # what the killed writer left is hidden staging only, never the final name
    leftovers = [p for p in tmp_path.iterdir() if p.name != out.name]
    assert leftovers and all(p.name.startswith(f".{out.name}.tmp-") for p in leftovers)
    assert sorted(jio.remove_stale(out)) == sorted(leftovers)
    assert [p.name for p in tmp_path.iterdir()] == ([out.name] if previous else [])


@pytest.mark.parametrize("mode", ["dir", "file"])
def test_file_size_limit_is_a_clear_error_and_keeps_previous(tmp_path, mode):
    out = tmp_path / ("ckpt" if mode == "dir" else "model.safetensors")
    prev = _previous(out)
    proc = _start(out, mode, limit=5 * 2**20)  # 5 MiB per file, the shards would be 20 MB
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr
    assert "ERRNO 27" in stdout  # EFBIG
    assert str(out) in stdout and "file size limit" in stdout and "layers." in stdout
    _assert_previous(out, prev)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # temporaries removed


def test_error_in_writer_block_keeps_previous(tmp_path):
    out = tmp_path / "ckpt"
    prev = _previous(out)
    with pytest.raises(RuntimeError, match="boom"):
        with jio.ShardedWriter(out, overwrite=True) as w:
            w.add("x", np.zeros(3, np.float32))
            raise RuntimeError("boom")
    _assert_previous(out, prev)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
