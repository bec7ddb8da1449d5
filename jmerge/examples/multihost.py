"""Merging on many hosts: ``python -m jmerge.examples.multihost``, one process per host.

The same script runs on one machine, on a TPU pod slice, and on a multi-node GPU cluster.
Each process

1. joins the job with :func:`jax.distributed.initialize` (the coordinator address, the number
   of processes and this process's id come from the command line, or, with no flags, from the
   environment: TPU pod metadata, SLURM's ``SLURM_*`` variables, Open MPI, ...);
2. builds the global mesh ``("data", "model")`` of :func:`jmerge.sharding.make_mesh`: the data
   axis spans the processes, the model axis a process's own devices;
3. places the pretrained and fine-tuned parameters on the mesh (:func:`jmerge.sharding.
   shard_params`: every process passes the same full values, each keeps its own shards; in a
   real run they come from a checkpoint, restored straight onto the shardings with
   :func:`jmerge.io.restore_orbax`);
4. loads **only its own share** of each task's curvature batch and builds the global batch from
   the shares (:func:`jmerge.sharding.shard_batch` with ``process_local=True``);
5. computes each task's data-parallel diagonal Fisher (``jmerge.fisher_diag``: per-example
   squares summed on each device, then one all-reduce over the data axis) and matrix-free
   Fisher operator (``jmerge.curvature.fisher_operator``: each mat-vec is a sum over the global
   batch, the same all-reduce);
6. merges the backbones (heads excluded) with MaTS (CG on the matrix-free Fishers) and with
   uncertainty-based gradient matching (diagonal Fishers), on the sharded parameters; the
   results keep the parameters' shardings.

The model is the digits MLP of :mod:`jmerge.examples.digits` (64 → 128 → 128 → 10) and the
curvature batches are the digits task views; the fine-tuned models are stand-ins,
``θ_t = θ0 + scale · ε_t`` with seeded ``ε_t`` (so that every process builds the same values
without training). ``tests/test_multihost.py`` runs two processes of 4 CPU devices each on
loopback and checks that every output equals a single-process run's to 1e-5.

Failure: if a process dies, the others stop within about ``--heartbeat-timeout`` seconds
(jax's coordination service notices the missing heartbeats and terminates the survivors with
"Terminating process because the JAX distributed service detected fatal errors ... another
task died"); a process that cannot reach the coordinator gives up after ``--init-timeout``.

Usage::

    # one machine, two processes of 4 CPU devices each (run both commands):
    python -m jmerge.examples.multihost --coordinator 127.0.0.1:12355 --num-processes 2 \\
        --process-id 0 --cpu-devices 4
    python -m jmerge.examples.multihost --coordinator 127.0.0.1:12355 --num-processes 2 \\
        --process-id 1 --cpu-devices 4
    # TPU pod slice / SLURM: no flags, jax reads the cluster from the environment
    python -m jmerge.examples.multihost
    # one process, no distributed service (the reference run):
    python -m jmerge.examples.multihost --num-processes 1 --cpu-devices 8

``--output DIR`` writes ``DIR/process<i>.npz`` from every process: the gathered merged
parameters and task 0's diagonal Fisher (flat keys: ``<output>/<leaf path>``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

PyTree = Any

#: Outputs gathered and compared across runs.
OUTPUTS = ("fisher0", "mats", "gradient_matching")


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_devices: int | None = None,
    init_timeout: int = 300,
    heartbeat_timeout: int = 100,
    shutdown_timeout: int = 300,
) -> None:
    """Join the multi-process job (or stay single-process), before jax's backends start.

    Args:
      coordinator: ``host:port`` of process 0's coordination service; ``None`` lets jax take
        it from the environment (TPU pod slice, SLURM, Open MPI, ...).
      num_processes, process_id: likewise; ``num_processes == 1`` starts no distributed
        service at all.
      cpu_devices: number of CPU devices of this process (``jax_num_cpu_devices``), for a CPU
        run; ``None`` keeps the default. Multi-process CPU runs use gloo collectives.
      init_timeout: seconds to wait for every process to join
        (``jax.distributed.initialize(initialization_timeout=...)``).
      heartbeat_timeout: seconds without heartbeats after which a process counts as dead and
        every other process is terminated (``heartbeat_timeout_seconds``).
      shutdown_timeout: seconds to wait for the others at exit (``shutdown_timeout_seconds``).

    Raises:
      RuntimeError: if jax's backends were already started (devices cannot change then).
      ValueError: (from jax) no coordinator given and none found in the environment.
    """
    if cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    if num_processes == 1:
        return
    # CPU collectives across processes (the default in recent jax; explicit for older ones).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=int(init_timeout),
        heartbeat_timeout_seconds=int(heartbeat_timeout),
        shutdown_timeout_seconds=int(shutdown_timeout),
    )


def local_share(x: np.ndarray, mesh: jax.sharding.Mesh, axis: str = "data") -> np.ndarray:
    """This process's rows of a global batch ``x`` for :func:`jmerge.sharding.shard_batch`
    with ``process_local=True``: the contiguous block of the data-axis shards its devices hold.

    In a real job each process reads only these rows from storage; here the (small) global
    batch is computed everywhere and sliced, so that the test can compare with one process.
    """
    dim = mesh.axis_names.index(axis)
    me = jax.process_index()
    devices = mesh.devices
    mine = sorted({i[dim] for i in np.ndindex(devices.shape) if devices[i].process_index == me})
    n = mesh.shape[axis]
    if x.shape[0] % n:
        raise ValueError(f"batch of {x.shape[0]} examples does not split over {n} data shards.")
    rows = x.shape[0] // n
    if mine != list(range(mine[0], mine[-1] + 1)):
        raise ValueError(f"process {me} holds non-contiguous data shards {mine}.")
    return x[mine[0] * rows : (mine[-1] + 1) * rows]


def build_inputs(num_tasks: int, examples: int, seed: int, scale: float):
    """The digits MLP, θ0, stand-in fine-tuned models and each task's global curvature batch
    (host NumPy values, the same in every process)."""
    from jmerge.examples import digits

    model = digits.make_model("mlp")
    theta0 = jax.tree.map(np.asarray, digits.init_params(model, seed))
    finetuned = [
        jax.tree.map(
            lambda a, e: (a + scale * e).astype(a.dtype),
            theta0,
            jax.tree.map(np.asarray, digits.init_params(model, seed + 1 + t)),
        )
        for t in range(num_tasks)
    ]
    data = digits.load_data(seed)
    tasks = list(digits.TASKS)[:num_tasks]
    xs = [np.asarray(digits.curvature_inputs(data, t, examples, seed)[0]) for t in tasks]
    return model, theta0, finetuned, xs, tasks


def merge_on_mesh(
    mesh: jax.sharding.Mesh,
    *,
    num_tasks: int = 2,
    examples: int = 64,
    maxiter: int = 10,
    seed: int = 0,
    scale: float = 0.1,
    verbose: bool = False,
) -> dict[str, PyTree]:
    """Steps 3–6 of the module docstring on ``mesh``; returns global arrays.

    Returns:
      ``{"fisher0": task 0's diagonal Fisher, "mats": MaTS-merged params, "gradient_matching":
      gradient-matching-merged params}``, each a pytree like the parameters, sharded like them.
    """
    import jmerge
    from jmerge.examples import digits
    from jmerge.sharding import shard_batch, shard_params

    model, theta0, finetuned, xs, tasks = build_inputs(num_tasks, examples, seed, scale)
    logits_fn = digits.LogitsFn(model)

    def say(*msg):
        if verbose and jax.process_index() == 0:
            print("jmerge.multihost:", *msg, flush=True)

    # 3. parameters: every process passes the same values, each keeps its shards.
    theta0 = shard_params(theta0, mesh, min_size=0)
    finetuned = [shard_params(p, mesh, min_size=0) for p in finetuned]
    # 4. curvature batches: each process contributes its own rows.
    xs = [shard_batch(local_share(x, mesh), mesh, process_local=True) for x in xs]
    say(f"tasks {tasks}; batch {xs[0].shape} as {xs[0].sharding.spec}")

    # 5. curvature: data-parallel sums over the global batch.
    start = time.perf_counter()
    pairs = list(zip(finetuned, xs, strict=True))
    fishers = [jmerge.fisher_diag(logits_fn, p, x, kind="exact") for p, x in pairs]
    ops = [jmerge.curvature.fisher_operator(logits_fn, p, x) for p, x in pairs]
    jax.block_until_ready(fishers)
    say(f"diagonal Fishers in {time.perf_counter() - start:.1f} s")

    # 6. merges on the sharded parameters (heads stay out of the merge).
    start = time.perf_counter()
    mats = jmerge.mats(
        theta0, finetuned, ops, init="task_arithmetic", init_alpha=0.5,
        damping=1e-2, maxiter=maxiter, rtol=0.0, exclude=r"head",
    )  # fmt: skip
    gm = jmerge.gradient_matching(
        theta0, finetuned, fishers, alpha=0.5, prior=1e-2, exclude=r"head"
    )
    jax.block_until_ready((mats.params, gm.params))
    say(
        f"MaTS: {int(mats.info.num_steps)} CG steps, "
        f"residual {float(mats.info.residual_norm):.2e}; "
        f"gradient matching: solver {int(gm.info.solver)}; {time.perf_counter() - start:.1f} s"
    )
    kernel = mats.params["params"]["backbone"]["dense1"]["kernel"]
    say(f"merged dense1 kernel {kernel.shape}: {kernel.sharding}")
    return {"fisher0": fishers[0], "mats": mats.params, "gradient_matching": gm.params}


def gather(outputs: dict[str, PyTree]) -> dict[str, np.ndarray]:
    """Every output leaf as one host NumPy array in every process (for checking only: it
    copies the whole tree to each host), keyed ``<output>/<leaf path>``."""
    from jax.experimental import multihost_utils

    flat = {}
    for name, tree in outputs.items():
        host = multihost_utils.process_allgather(tree, tiled=True)
        for path, leaf in jax.tree_util.tree_leaves_with_path(host):
            flat[f"{name}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    return flat


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jmerge.examples.multihost",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--coordinator", help="host:port of process 0 (default: from the environment)")
    p.add_argument("--num-processes", type=int, help="default: from the environment")
    p.add_argument("--process-id", type=int, help="default: from the environment")
    p.add_argument("--cpu-devices", type=int, help="CPU devices per process (CPU runs)")
    p.add_argument("--model-axis", type=int, default=None, help="size of the model axis "
                   "(default: the devices of one process)")  # fmt: skip
    p.add_argument("--init-timeout", type=int, default=300, help="seconds (default 300)")
    p.add_argument("--heartbeat-timeout", type=int, default=100, help="seconds (default 100)")
    p.add_argument("--shutdown-timeout", type=int, default=300, help="seconds (default 300)")
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--examples", type=int, default=64, help="global curvature batch per task")
    p.add_argument("--maxiter", type=int, default=10, help="MaTS CG iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, help="write DIR/process<i>.npz (gathered outputs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    initialize(
        args.coordinator,
        args.num_processes,
        args.process_id,
        cpu_devices=args.cpu_devices,
        init_timeout=args.init_timeout,
        heartbeat_timeout=args.heartbeat_timeout,
        shutdown_timeout=args.shutdown_timeout,
    )
    from jmerge.sharding import make_mesh

    shape = None if args.model_axis is None else (-1, args.model_axis)
    mesh = make_mesh(shape, ("data", "model"))
    me, n = jax.process_index(), jax.process_count()
    print(
        f"jmerge.multihost: process {me}/{n} ready: {jax.local_device_count()} local of "
        f"{jax.device_count()} {jax.default_backend()} devices, mesh {dict(mesh.shape)}",
        flush=True,
    )
    outputs = merge_on_mesh(
        mesh,
        num_tasks=args.tasks,
        examples=args.examples,
        maxiter=args.maxiter,
        seed=args.seed,
        verbose=True,
    )
    flat = gather(outputs)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        np.savez(args.output / f"process{me}.npz", **flat)
    print(f"jmerge.multihost: process {me}/{n} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
