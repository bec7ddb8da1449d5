"""Sharding benchmark: merges and a CG solve on 1 device against the same sizes on 8 devices.

Devices: the first 8 of ``jax.devices()`` where there are 8 (GPUs, TPU cores), else 8 host
CPU devices (``--xla_force_host_platform_device_count=8``, set by this script before jax
starts; on a CPU the 8 "devices" share the machine's cores, so the time ratio shows the cost
of partitioning rather than a speed-up). The 8-device runs place every parameter-shaped
tree with :func:`jmerge.sharding.shard_params` on the ``(data=1, model=8)`` mesh of
:func:`jmerge.sharding.make_mesh` (each leaf sharded 8 ways on its largest axis); the 1-device
runs put the same values on one device. Everything is float32 and called through ``jax.jit``.

Part 1 — merges (T = 4 models of n parameters, over a pytree of four leaves: an embedding
``(n/4/256, 256)``, a kernel ``(n/2/512, 512)`` with bias ``(512,)``, an output kernel): average,
task arithmetic (α = 0.3), TIES (density 0.2), DARE (density 0.2), Fisher merging, gradient
matching (diagonal Fishers, prior 1e-3: closed form) and MaTS (diagonal curvatures plus a
rank-one matrix-free term, so that it runs CG: 20 iterations). Columns: median time on 1 and
on 8 devices, their ratio, and the largest collective in the 8-device compiled program (bytes
on one device): parameter-sized means an all-gather of a sharded leaf.

Part 2 — CG (``jmerge.cg``, no preconditioner, rtol = 0 so exactly ``K = 20`` iterations) on
A = diag(d) + u uᵀ (a ``Diagonal`` plus a ``MatrixFree`` rank-one term), at two parameter
counts. Columns: times and ratio as above; the collectives inside the CG iteration loop (the
innermost ``while`` body of the compiled HLO, per iteration: count and bytes), which must be
O(1) scalars whatever n; and from the compiled program's ``memory_analysis()`` (per device)
its argument, output and temporary bytes in units of one device's share of one parameter
vector P = 4n/8 bytes (checked at the largest n; at small n fixed-size buffers add a little).
The arguments hold b and the operator's own d and u (3 P); the CG state
is x, r, p, Ap (and z = r without a preconditioner): the target is at most about 6 P for b plus
the solver's buffers, i.e. total − 2 P (d, u) ≤ 6.

Run: ``python benchmarks/bench_sharding.py [--quick] [--repeats N]``.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _hlo import collectives, innermost, loop_collectives  # noqa: E402
from _timing import format_table, interleaved_medians, machine_info  # noqa: E402

import jmerge  # noqa: E402
from jmerge.curvature.operators import Diagonal, MatrixFree  # noqa: E402
from jmerge.sharding import make_mesh, shard_params  # noqa: E402

T = 4
CG_ITERS = 20
N_DEVICES = 8


def _devices() -> list[jax.Device]:
    devs = jax.devices()
    return devs[:N_DEVICES] if len(devs) >= N_DEVICES else jax.devices("cpu")[:N_DEVICES]


def _shapes(n: int) -> dict:
    return {
        "embed": (n // 4 // 256, 256),
        "dense": {"kernel": (n // 2 // 512, 512), "bias": (512,)},
        "out": (n // 4 // 128 - 4, 128),  # the bias's 512 taken off: n in total
    }


def _tree(n: int, seed: int, positive: bool = False) -> dict:
    rng = np.random.default_rng(seed)

    def leaf(s):
        x = rng.standard_normal(s, dtype=np.float32)
        return (0.1 + x * x) if positive else x

    return jax.tree.map(leaf, _shapes(n), is_leaf=lambda s: isinstance(s, tuple))


def _vdot(a, b):
    # Σ over leaves of sum(x * y): elementwise, then one scalar all-reduce per leaf (jnp.vdot
    # would ravel a sharded leaf, an all-gather).
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _rank_one(u) -> MatrixFree:
    return MatrixFree(lambda v, u: jax.tree.map(lambda ui: _vdot(u, v) * ui, u), operands=(u,))


def _placements(devices):
    mesh = make_mesh(devices=devices)  # ("data": 1, "model": 8)
    one = lambda tree: jax.device_put(tree, devices[0])
    eight = lambda tree: shard_params(tree, mesh, min_size=0)
    return {"1 device": one, f"{len(devices)} devices": eight}


def _largest_collective(compiled) -> int:
    return max((c.nbytes for c in collectives(compiled.as_text())), default=0)


def bench_merges(n: int, repeats: int, devices) -> list[list]:
    theta0 = _tree(n, 0)
    fts = [jax.tree.map(lambda a, e: a + 0.1 * e, theta0, _tree(n, 1 + t)) for t in range(T)]
    fis = [_tree(n, 10 + t, positive=True) for t in range(T)]
    u = jax.tree.map(lambda a: 1e-3 * a, _tree(n, 20))
    key = jax.random.key(0)
    merges = {
        "average": lambda th, f, c, u: jmerge.average(f),
        "task_arithmetic": lambda th, f, c, u: jmerge.task_arithmetic(th, f, 0.3),
        "ties": lambda th, f, c, u: jmerge.ties(th, f, density=0.2),
        "dare": lambda th, f, c, u: jmerge.dare(th, f, density=0.2, key=key),
        "fisher_merge": lambda th, f, c, u: jmerge.fisher_merge(f, c),
        "gradient_matching": lambda th, f, c, u: jmerge.gradient_matching(
            th, f, c, alpha=0.3, prior=1e-3
        ).params,
        "mats (CG)": lambda th, f, c, u: jmerge.mats(
            th, f, [Diagonal(ci) + _rank_one(u) for ci in c], maxiter=CG_ITERS, rtol=0.0,
            preconditioner=None,
        ).params,
    }  # fmt: skip
    times, biggest = {}, {}
    for where, place in _placements(devices).items():
        args = place((theta0, fts, fis, u))
        thunks = {}
        for name, fn in merges.items():
            jitted = jax.jit(fn)
            compiled = jitted.lower(*args).compile()
            biggest[name, where] = _largest_collective(compiled)
            thunks[name] = lambda c=compiled, a=args: c(*a)
        for name, t in interleaved_medians(thunks, repeats).items():
            times[name, where] = t
    one, many = _placements(devices)
    rows = []
    for name in merges:
        t1, t8 = times[name, one], times[name, many]
        rows.append(
            [name, f"{1e3 * t1:.2f}", f"{1e3 * t8:.2f}", f"{t8 / t1:.2f}", biggest[name, many]]
        )
    return rows


def bench_cg(sizes: list[int], repeats: int, devices) -> list[list]:
    rows = []
    for n in sizes:
        b, d = _tree(n, 0), _tree(n, 1, positive=True)
        u = jax.tree.map(lambda a: 1e-2 * a, _tree(n, 2))
        per_device = 4 * n / len(devices)
        times, stats = {}, {}
        for where, place in _placements(devices).items():
            args = place((b, d, u))
            solve = jax.jit(
                lambda b, d, u: jmerge.cg(Diagonal(d) + _rank_one(u), b, rtol=0.0, maxiter=CG_ITERS)
            )
            compiled = solve.lower(*args).compile()
            text = compiled.as_text()
            loops = loop_collectives(text)
            inner = [c for name in innermost(text) for c in loops[name]]
            all_scalar = all(c.shape == () for c in inner)
            mem = compiled.memory_analysis()
            stats[where] = (inner, mem, all_scalar)
            times[where] = interleaved_medians({0: lambda c=compiled, a=args: c(*a)}, repeats)[0]
        one, many = _placements(devices)
        inner, mem, all_scalar = stats[many]

        def unit(x, per_device=per_device):
            return f"{x / per_device:.2f}"

        total = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )
        rows.append(
            [
                f"{n:.2e}".replace("e+0", "e"),
                f"{1e3 * times[one]:.2f}",
                f"{1e3 * times[many]:.2f}",
                f"{times[many] / times[one]:.2f}",
                f"{len(inner)} ({', '.join(sorted({c.op for c in inner}))})",
                sum(c.nbytes for c in inner),
                unit(mem.argument_size_in_bytes),
                unit(mem.output_size_in_bytes),
                unit(mem.temp_size_in_bytes),
                unit(total),
                unit(total - 2 * per_device),
                all_scalar,
            ]
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI sizes (seconds)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    devices = _devices()
    print(machine_info())
    print(f"8-device runs on: {devices[0].device_kind} x {len(devices)}")
    n_merge = 2**16 if args.quick else 2**23
    cg_sizes = [2**14, 2**16] if args.quick else [2**20, 2**23]

    print(f"\nMerges, T = {T} models of n = {n_merge} float32 parameters (ms: median)")
    header = ["merge", "1 dev ms", "8 dev ms", "8/1", "largest collective B"]
    print(format_table(header, bench_merges(n_merge, args.repeats, devices)))

    print(f"\nCG, {CG_ITERS} iterations on diag(d) + u uᵀ; memory per device in P = 4n/8 bytes")
    header = [
        "n", "1 dev ms", "8 dev ms", "8/1", "collectives/iter", "bytes/iter",
        "args P", "out P", "temp P", "total P", "CG bufs P",
    ]  # fmt: skip
    rows = bench_cg(cg_sizes, args.repeats, devices)
    print(format_table(header, [r[:-1] for r in rows]))
    scalar = len({r[5] for r in rows}) == 1 and all(r[-1] for r in rows)
    print(
        f"{'PASS' if scalar else 'MISS'} collectives per CG iteration all scalar, bytes the same "
        f"at every n: {[r[5] for r in rows]}"
    )
    bufs = [float(r[-2]) for r in rows]
    ok = bufs[-1] <= 6.5  # at the largest n, where fixed-size buffers are negligible
    print(
        f"{'PASS' if ok else 'MISS'} CG buffers per device <= ~6 P (b, x, r, p, Ap, z) at the "
        f"largest n: {bufs}"
    )


if __name__ == "__main__":
    main()
