"""Multi-process merges over ``jax.distributed`` on loopback (``jmerge/examples/multihost.py``).

Two processes of 4 CPU devices each join one job (coordinator on 127.0.0.1, a free port, gloo
collectives), build the global ("data", "model") mesh, load their own halves of the curvature
batches, compute diagonal Fishers and matrix-free Fisher operators data-parallel, and merge
with MaTS (CG) and gradient matching on sharded parameters. A third process runs the same
script alone on 8 devices; every gathered output must match it to 1e-5.

A second test kills one process after both have joined, and checks that the survivor exits
non-zero with jax's "another task died" message instead of hanging: the coordination
service's heartbeat timeout (``--heartbeat-timeout``) bounds the time to failure.

The workers run without the test session's float64 / 8-device settings (float32, as a user
runs them) and with XLA's cheap optimisation passes.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ["-m", "jmerge.examples.multihost"]
TIMEOUT = 300  # seconds for a whole run; the workers give up on a dead peer long before
DEATH_MESSAGES = (
    "another task died",  # survivor of a dead non-coordinator (missing heartbeats)
    "leader task was preempted/died",  # survivor of a dead coordinator
    "detected fatal errors",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Worker:
    """A worker process whose stdout and stderr go to files (no pipe can fill up)."""

    def __init__(self, name: str, args: list[str], logs: Path):
        self.name = name
        self.out = logs / f"{name}.out"
        self.err = logs / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, *SCRIPT, *args],
                cwd=ROOT,
                env=_env(),
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    def tail(self, lines: int = 25) -> str:
        text = self.out.read_text() + self.err.read_text()
        kept = [ln for ln in text.splitlines() if not ln.lstrip().startswith(("@", "[Gloo]"))]
        return f"--- {self.name} (exit {self.proc.poll()}) ---\n" + "\n".join(kept[-lines:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _wait(workers: list[Worker], timeout: float) -> None:
    """Wait for every worker; on timeout kill them all and fail with their output."""
    deadline = time.monotonic() + timeout
    try:
        for w in workers:
            w.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for w in workers:
            w.kill()
        pytest.fail(
            f"workers still running after {timeout:.0f} s; killed.\n"
            + "\n".join(w.tail() for w in workers)
        )


def _pair(tmp_path: Path, extra: list[str]) -> list[Worker]:
    port = _free_port()
    return [
        Worker(
            f"process{i}",
            [
                "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                "--process-id", str(i), "--cpu-devices", "4", "--init-timeout", "120", *extra,
            ],  # fmt: skip
            tmp_path,
        )
        for i in range(2)
    ]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    out = tmp_path / "out"
    workers = _pair(tmp_path, ["--heartbeat-timeout", "120", "--output", str(out / "multi")])
    workers.append(
        Worker(
            "single",
            ["--num-processes", "1", "--cpu-devices", "8", "--output", str(out / "single")],
            tmp_path,
        )
    )
    try:
        _wait(workers, TIMEOUT)
    finally:
        for w in workers:
            w.kill()
    logs = "\n".join(w.tail() for w in workers)
    assert all(w.proc.returncode == 0 for w in workers), logs
    assert "mesh {'data': 2, 'model': 4}" in workers[0].out.read_text(), logs

    ref = dict(np.load(out / "single" / "process0.npz"))
    assert {k.split("/")[0] for k in ref} == {"fisher0", "mats", "gradient_matching"}
    for i in range(2):
        got = dict(np.load(out / "multi" / f"process{i}.npz"))
        assert sorted(got) == sorted(ref)
        for key, expected in ref.items():
            # 1e-5 relative to the largest entry of that output (all its leaves): leaves
            # near zero (biases) carry float32 round-off of the CG iterates.
            name = key.split("/")[0]
            scale = max(float(np.max(np.abs(v))) for k, v in ref.items() if k.startswith(name))
            np.testing.assert_allclose(
                got[key], expected, rtol=1e-5, atol=1e-5 * scale, err_msg=f"process {i}: {key}"
            )
    # The merges moved the backbone, and left the heads (excluded) at θ0's.
    mats_kernel = ref["mats/['params']['backbone']['dense1']['kernel']"]
    gm_kernel = ref["gradient_matching/['params']['backbone']['dense1']['kernel']"]
    assert np.max(np.abs(mats_kernel - gm_kernel)) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["peer-dies", "coordinator-dies"])
def test_survivor_fails_when_a_process_dies(tmp_path, victim):
    workers = _pair(tmp_path, ["--heartbeat-timeout", "5", "--shutdown-timeout", "5"])
    dead, survivor = workers[victim], workers[1 - victim]
    try:
        deadline = time.monotonic() + TIMEOUT
        while "ready" not in dead.out.read_text():
            if dead.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the worker never got ready.\n" + "\n".join(w.tail() for w in workers))
            time.sleep(0.2)
        dead.kill()
        killed = time.monotonic()
        _wait([survivor], TIMEOUT)
        elapsed = time.monotonic() - killed
    finally:
        for w in workers:
            w.kill()
    log = survivor.tail()
    assert survivor.proc.returncode != 0, log
    assert any(m in log for m in DEATH_MESSAGES), log
    print(f"survivor (process {1 - victim}) failed {elapsed:.1f} s after process {victim} died")
