"""Curvature benchmark: diagonal Fisher, HVP and GGN-vp as ratios to one batched gradient.

For each model it times, side by side in one run (interleaved rounds, median after a warm-up
compile, ``block_until_ready``), on the same batch of N examples:

* ``grad``: ``jax.jit(jax.grad(mean NLL))`` — the reference every other row is divided by;
* ``fisher fast <kind>``: ``jmerge.curvature.fisher.fisher_diag(..., kind=<kind>)``, the
  per-layer fast path, for ``empirical``, ``sampled`` and ``exact``, called inside an outer
  ``jax.jit`` (so the eager finiteness checks are not timed), and once more as a plain eager call
  (``fisher fast empirical, eager``: what a user pays, checks and dispatch included);
* ``fisher generic empirical``: the same with ``fast=False`` (``jax.vmap`` of per-example
  ``jax.vjp``); with ``--generic-n n`` it runs on the first n examples only and its time is
  scaled by N/n (marked in the table);
* ``hvp``: ``jmerge.curvature.hvp.hvp`` of the mean NLL (forward-over-reverse), jitted;
* ``ggn_vp``: ``jmerge.curvature.hvp.ggn_vp`` with the mean NLL in logit space, jitted.

Models (float32, Flax linen): an MLP 784-1024-1024-10 (ReLU) with N = 512; a CNN on 28×28×1
inputs (three 3×3 convolutions, two of stride 2, SAME padding, then Dense 128 and Dense 10)
with N = 256; a pre-LayerNorm causal transformer (vocab 256, T = 64, d = 128, 4 heads,
2 blocks, learned positions, per-token logits) with N = 32 sequences. ``--quick`` shrinks all
of them. ``exact`` on the transformer needs T·K backward columns per sequence (16384 at full
size, all of one sequence's columns at once in memory) and is skipped above
``--max-exact-columns``.

Targets (DESIGN.md §4): fast Fisher (empirical, sampled) ≤ 2× grad on the MLP and ≤ 3× on the
CNN and the transformer; fast ≥ 50× faster than generic on the MLP; HVP ≤ 2.5× grad.

Run: ``python benchmarks/bench_curvature.py [--quick] [--repeats N] [--generic-n n]``.
"""

from __future__ import annotations

import argparse
import functools
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _timing import format_table, interleaved_medians, machine_info

from jmerge.curvature.fisher import fisher_diag
from jmerge.curvature.hvp import ggn_vp, hvp

F32 = jnp.float32

# ---------------------------------------------------------------------------- models


class MLP(nn.Module):
    widths: tuple[int, ...]
    classes: int

    @nn.compact
    def __call__(self, x):
        for w in self.widths:
            x = nn.relu(nn.Dense(w, param_dtype=F32)(x))
        return nn.Dense(self.classes, param_dtype=F32)(x)


class CNN(nn.Module):
    channels: tuple[int, int, int]
    hidden: int
    classes: int

    @nn.compact
    def __call__(self, x):
        c0, c1, c2 = self.channels
        x = nn.relu(nn.Conv(c0, (3, 3), padding="SAME", param_dtype=F32)(x))
        x = nn.relu(nn.Conv(c1, (3, 3), strides=(2, 2), padding="SAME", param_dtype=F32)(x))
        x = nn.relu(nn.Conv(c2, (3, 3), strides=(2, 2), padding="SAME", param_dtype=F32)(x))
        x = nn.relu(nn.Dense(self.hidden, param_dtype=F32)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.classes, param_dtype=F32)(x)


class Transformer(nn.Module):
    vocab: int
    seq: int
    dim: int
    heads: int
    layers: int

    @nn.compact
    def __call__(self, ids):
        pos = self.param("pos", nn.initializers.normal(0.02), (self.seq, self.dim), F32)
        h = nn.Embed(self.vocab, self.dim, param_dtype=F32)(ids) + pos[: ids.shape[-1]]
        mask = nn.make_causal_mask(ids)
        for _ in range(self.layers):
            y = nn.LayerNorm(param_dtype=F32)(h)
            h = h + nn.MultiHeadDotProductAttention(num_heads=self.heads, param_dtype=F32)(
                y, mask=mask
            )
            y = nn.LayerNorm(param_dtype=F32)(h)
            h = h + nn.Dense(self.dim, param_dtype=F32)(
                nn.gelu(nn.Dense(4 * self.dim, param_dtype=F32)(y))
            )
        return nn.Dense(self.vocab, param_dtype=F32)(nn.LayerNorm(param_dtype=F32)(h))


class _Apply:
    """``logits_fn(params, x) = module.apply({"params": params}, x)``: one object per model, so
    ``fisher_diag``'s static ``logits_fn`` hits its jit cache."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, params, x):
        return self.module.apply({"params": params}, x)


def build_models(quick: bool, names: list[str]) -> list[dict]:
    """(name, logits_fn, params, inputs, labels) for each requested model, float32."""
    rng = np.random.default_rng(0)
    key = jax.random.key(0)
    specs = {
        "mlp": (
            MLP((128, 128) if quick else (1024, 1024), 10),
            lambda n: rng.normal(size=(n, 784)).astype(np.float32),
            64 if quick else 512,
            (),
            10,
        ),
        "cnn": (
            CNN((4, 8, 8) if quick else (32, 64, 64), 32 if quick else 128, 10),
            lambda n: rng.normal(size=(n, 28, 28, 1)).astype(np.float32),
            16 if quick else 256,
            (),
            10,
        ),
        "transformer": (
            Transformer(32, 8, 16, 2, 1) if quick else Transformer(256, 64, 128, 4, 2),
            None,
            8 if quick else 32,
            None,
            None,
        ),
    }
    out = []
    for name in names:
        module, make_x, n, token_shape, classes = specs[name]
        if name == "transformer":
            classes, token_shape = module.vocab, (module.seq,)
            x = rng.integers(0, classes, size=(n, module.seq)).astype(np.int32)
        else:
            x = make_x(n)
        y = rng.integers(0, classes, size=(n, *token_shape)).astype(np.int32)
        x, y = jnp.asarray(x), jnp.asarray(y)
        params = module.init(key, x[:1])["params"]
        out.append(
            dict(
                name=name,
                logits_fn=_Apply(module),
                params=params,
                x=x,
                y=y,
                n=n,
                cols=classes * math.prod(token_shape),
                num_params=sum(p.size for p in jax.tree.leaves(params)),
            )
        )
    return out


# ---------------------------------------------------------------------------- operations


def _nll(logits, y):
    logp = jax.nn.log_softmax(logits.astype(F32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))


def _ops(m: dict, generic_n: int | None, max_exact_columns: int):
    """The thunks to time for model ``m``, and notes per op (keyed by op name)."""
    fn, params, x, y = m["logits_fn"], m["params"], m["x"], m["y"]
    key = jax.random.key(1)
    loss = lambda p, batch: _nll(fn(p, batch[0]), batch[1])
    out_loss = lambda z, batch: _nll(z, batch[1])
    model_fn = lambda p, batch: fn(p, batch[0])
    v = jax.tree.map(
        lambda p, k: jax.random.normal(k, p.shape, F32),
        params,
        jax.tree.unflatten(
            jax.tree.structure(params), list(jax.random.split(key, len(jax.tree.leaves(params))))
        ),
    )
    grad = jax.jit(jax.grad(loss))
    hvp_j = jax.jit(functools.partial(hvp, loss))
    ggn_j = jax.jit(functools.partial(ggn_vp, model_fn, out_loss))

    def fisher(kind, fast):
        return jax.jit(lambda p, xs, ys, k: fisher_diag(fn, p, xs, ys, kind=kind, key=k, fast=fast))

    thunks, notes = {}, {}
    thunks["grad"] = lambda: grad(params, (x, y))
    for kind in ("empirical", "sampled", "exact"):
        if kind == "exact" and m["cols"] > max_exact_columns:
            notes[f"fisher fast {kind}"] = (
                f"skipped: T*K = {m['cols']} columns/example > {max_exact_columns}; use sampled"
            )
            continue
        f = fisher(kind, True)
        thunks[f"fisher fast {kind}"] = lambda f=f: f(params, x, y, key)
    thunks["fisher fast empirical, eager"] = lambda: fisher_diag(fn, params, x, y, kind="empirical")
    ng = m["n"] if generic_n is None else min(generic_n, m["n"])
    g = fisher("empirical", False)
    thunks["fisher generic empirical"] = lambda: g(params, x[:ng], y[:ng], key)
    if ng < m["n"]:
        notes["fisher generic empirical"] = f"run on n={ng}, time scaled x{m['n'] / ng:g}"
    thunks["hvp"] = lambda: hvp_j(params, (x, y), v)
    thunks["ggn_vp"] = lambda: ggn_j(params, (x, y), v)
    scale = {"fisher generic empirical": m["n"] / ng}
    return thunks, notes, scale


def bench_model(m: dict, repeats: int, generic_n: int | None, max_exact_columns: int) -> dict:
    thunks, notes, scale = _ops(m, generic_n, max_exact_columns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first: dict = {}
        t = interleaved_medians(thunks, repeats, first_call=first)
    fallbacks = sorted({str(w.message) for w in caught if "fast path" in str(w.message)})
    t = {k: s * scale.get(k, 1.0) for k, s in t.items()}
    return dict(m, times=t, first=first, notes=notes, fallbacks=fallbacks)


# ---------------------------------------------------------------------------- report

_TARGETS = {"mlp": 2.0, "cnn": 3.0, "transformer": 3.0}


def report(results: list[dict]) -> tuple[str, list[str]]:
    rows = []
    for r in results:
        t, tg = r["times"], r["times"]["grad"]
        for op, s in t.items():
            first = f"{r['first'][op]:.2f}"
            note = r["notes"].get(op, "")
            rows.append([r["name"], op, f"{1e3 * s:.2f}", f"{s / tg:.2f}", first, note])
        for op, note in r["notes"].items():
            if op not in t:
                rows.append([r["name"], op, "-", "-", "-", note])
    header = ["model", "op", "ms", "ratio to grad", "first call s", "note"]
    table = format_table(header, rows, "<<>>><")
    checks = []
    for r in results:
        t, tg, name = r["times"], r["times"]["grad"], r["name"]
        lim = _TARGETS[name]
        for kind in ("empirical", "sampled"):
            ratio = t[f"fisher fast {kind}"] / tg
            ok = "PASS" if ratio <= lim else "MISS"
            checks.append(
                f"{ok}  {name}: fisher fast {kind} = {ratio:.2f}x grad (target <= {lim:g})"
            )
        ratio = t["hvp"] / tg
        ok = "PASS" if ratio <= 2.5 else "MISS"
        checks.append(f"{ok}  {name}: hvp = {ratio:.2f}x grad (target <= 2.5)")
        if name == "mlp":
            speedup = t["fisher generic empirical"] / t["fisher fast empirical"]
            ok = "PASS" if speedup >= 50 else "MISS"
            checks.append(
                f"{ok}  mlp: fisher fast empirical is {speedup:.1f}x faster than generic "
                "(target >= 50)"
            )
    return table, checks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI sizes (seconds)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument(
        "--generic-n",
        type=int,
        default=None,
        help="run the generic path on this many examples and scale its time to N",
    )
    parser.add_argument(
        "--max-exact-columns",
        type=int,
        default=4096,
        help="skip kind='exact' above this many backward columns per example",
    )
    parser.add_argument(
        "--models",
        default="mlp,cnn,transformer",
        help="comma-separated subset of mlp,cnn,transformer",
    )
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.models.split(",") if s.strip()]
    unknown = set(names) - set(_TARGETS)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}")

    print(machine_info())
    results = []
    for m in build_models(args.quick, names):
        print(
            f"  {m['name']}: {m['num_params']:,} params, N = {m['n']}, "
            f"{m['cols']} logit columns/example",
            flush=True,
        )
        results.append(bench_model(m, args.repeats, args.generic_n, args.max_exact_columns))
    table, checks = report(results)
    print(
        f"\nTime per op: median of {args.repeats} after a warm-up call; ratio = op / grad (same"
        " run); first call s = the warm-up call (compile + run)"
    )
    print(table)
    for r in results:
        for msg in r["fallbacks"]:
            print(f"note ({r['name']}): {msg}")
    print("\nTargets")
    print("\n".join(checks))
    return results


if __name__ == "__main__":
    main()
