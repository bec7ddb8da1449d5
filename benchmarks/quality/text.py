"""Text suite: a byte-level transformer pretrained on text found on every machine, fine-tuned
per domain, merged by every method (issue 12, item 2).

Corpus (:func:`build_corpus`). Four domains, read from folders that a Linux machine with
Python has: ``python`` (the standard library's ``*.py``), ``c_headers`` (``/usr/include/**/*.h``),
``man`` (``/usr/share/man/man?/*.gz``, gunzipped, roff requests and escapes stripped crudely)
and ``licences`` (``/usr/share/common-licenses/*``, ``/usr/share/doc/*/copyright``). A missing
folder is skipped and the report says so; a domain with no file at all is dropped. Files are
deduplicated by content, shuffled with a fixed seed and assigned *whole* to test, then
validation, then train until each split holds its share of ``bytes_per_domain`` (each file
contributes at most ``file_cap`` bytes), so no test text is seen in training.

Model: a pre-LayerNorm causal transformer over bytes (vocabulary 256; Dense q/k/v/o and MLP
layers, so that RegMean's Grams and K-FAC see every matrix). θ0 is pretrained on the uniform
mixture of the four domains' train splits; θ_d fine-tunes every parameter of θ0 on domain d.

Metric. L_d(θ) is the mean next-byte cross-entropy (nats) on domain d's split. The share of
the fine-tuning gain that a merge keeps on d is

    kept_d = (L_d(θ0) − L_d(θ_merged)) / (L_d(θ0) − L_d(θ_d))

(1 = as good as the fine-tuned model, 0 = no better than θ0); a method is scored by the mean
over domains, on validation to choose its setting and on test to report it
(:func:`benchmarks.quality._common.select_by_validation`). Task negation θ0 − α τ_d (α > 0):
the forgetting on d, (L_d(θ_neg) − L_d(θ0)) / (L_d(θ0) − L_d(θ_d)), and the control domains'
loss change, with α chosen on validation as the largest forgetting whose control loss stays
within 5% of θ0's (Ilharco et al. 2023, §3's criterion with loss in place of accuracy).

Curvatures at θ_d on ``curv_windows`` training windows: the sampled-label diagonal Fisher (the
exact one costs 256 × seq backward columns per window; ``fisher_diag``'s docstring), RegMean
Grams, sampled K-FAC, the matrix-free Fisher, and θ0's sampled Fisher on the mixture (gradient
matching's prior, scaled by the pretraining set size N0; H_t = N_t F_t).

Checkpoints are cached with orbax under ``--cache`` keyed by the configuration and seed.

Run: ``python -m benchmarks.quality.text [--quick] [--seeds N] [--markdown] [--no-plots]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import hashlib
import json
import os
import re
import sysconfig
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jmerge
from benchmarks.quality._common import (
    RESULTS,
    Candidate,
    best_per_method,
    format_setting,
    mean_std,
    plot_curves,
    select_by_validation,
    table,
)

PyTree = Any
SPLITS = ("train", "val", "test")

# ---------------------------------------------------------------------------------------------
# Corpus


def read_plain(path: Path) -> bytes:
    return path.read_bytes()


_ROFF_REQUEST = re.compile(rb"^[.'][^\n]*\n?", re.M)
_ROFF_ESCAPE = re.compile(rb"\\(f\[[^]]*\]|f\(..|f.|\(..|s[-+]?\d|[&|^e\"%0~ ])")


def read_man(path: Path) -> bytes:
    """A gzipped man page with roff requests (lines starting with ``.`` or ``'``) dropped and
    the common escapes (font changes, special characters, sizes) removed."""
    raw = gzip.decompress(path.read_bytes())
    text = _ROFF_ESCAPE.sub(b"", _ROFF_REQUEST.sub(b"", raw))
    return text.replace(b"\\-", b"-")


class Source(NamedTuple):
    """Files of one domain: ``root.glob(pattern)`` read by ``reader``."""

    root: Path
    pattern: str
    reader: Callable[[Path], bytes] = read_plain


def default_sources() -> dict[str, list[Source]]:
    """The four domains' folders on this machine (some may be missing)."""
    return {
        "python": [Source(Path(sysconfig.get_paths()["stdlib"]), "**/*.py")],
        "c_headers": [Source(Path("/usr/include"), "**/*.h")],
        "man": [Source(Path("/usr/share/man"), "man?/*.gz", read_man)],
        "licences": [
            Source(Path("/usr/share/common-licenses"), "*"),
            Source(Path("/usr/share/doc"), "*/copyright"),
        ],
    }


class Corpus(NamedTuple):
    """``text[domain][split]``: bytes; ``files[domain][split]``: the files each split read;
    ``report``: one line per source folder and per domain."""

    text: dict[str, dict[str, bytes]]
    files: dict[str, dict[str, list[str]]]
    report: list[str]


def build_corpus(
    sources: Mapping[str, Sequence[Source]],
    *,
    bytes_per_domain: int,
    shares: tuple[float, float, float] = (0.8, 0.1, 0.1),
    file_cap: int = 2048,
    seed: int = 0,
) -> Corpus:
    """Deterministic file-level train/val/test text per domain.

    For each domain: list every file of its sources (a missing root is skipped and reported),
    drop files that cannot be read, are empty after reading, or duplicate an earlier file's
    content; shuffle the sorted list with ``numpy.random.default_rng([seed, i])`` and assign
    whole files to test, then validation, then train, each split up to
    ``share · bytes_per_domain`` bytes, each file contributing its first ``file_cap`` bytes.
    Domains with no file are dropped (reported).

    Raises:
      ValueError: shares not three positive numbers summing to 1; no domain with any file
        (the message lists every folder looked at).
    """
    if len(shares) != 3 or min(shares) <= 0 or abs(sum(shares) - 1) > 1e-9:
        raise ValueError(f"shares must be 3 positive numbers summing to 1, got {shares}")
    quota = dict(zip(("test", "val", "train"), (shares[2], shares[1], shares[0]), strict=True))
    text: dict[str, dict[str, bytes]] = {}
    files: dict[str, dict[str, list[str]]] = {}
    report: list[str] = []
    for i, (domain, srcs) in enumerate(sources.items()):
        paths: list[tuple[Path, Callable[[Path], bytes]]] = []
        for s in srcs:
            if not s.root.is_dir():
                report.append(f"{domain}: {s.root} missing, skipped")
                continue
            found = sorted(p for p in s.root.glob(s.pattern) if p.is_file())
            report.append(f"{domain}: {s.root}/{s.pattern}: {len(found)} files")
            paths += [(p, s.reader) for p in found]
        if not paths:
            report.append(f"{domain}: no files, domain dropped")
            continue
        order = np.random.default_rng([seed, i]).permutation(len(paths))
        seen: set[bytes] = set()
        out = {k: [] for k in SPLITS}
        names = {k: [] for k in SPLITS}
        used = dict.fromkeys(SPLITS, 0)
        splits = iter(("test", "val", "train"))
        split = next(splits)
        for j in order:
            path, reader = paths[j]
            try:
                data = reader(path)
            except (OSError, ValueError, EOFError):
                continue
            digest = hashlib.sha1(data).digest()
            if not data.strip() or digest in seen:
                continue
            seen.add(digest)
            room = int(quota[split] * bytes_per_domain) - used[split]
            chunk = data[: min(file_cap, room)]
            out[split].append(chunk)
            names[split].append(str(path))
            used[split] += len(chunk)
            if used[split] >= int(quota[split] * bytes_per_domain):
                split = next(splits, None)
                if split is None:
                    break
        text[domain] = {k: b"\n".join(v) for k, v in out.items()}
        files[domain] = names
        report.append(
            f"{domain}: "
            + ", ".join(f"{k} {len(text[domain][k])} B / {len(names[k])} files" for k in SPLITS)
        )
    if not text:
        raise ValueError("no text found in any source:\n" + "\n".join(report))
    return Corpus(text, files, report)


def windows(data: bytes, length: int) -> np.ndarray:
    """Non-overlapping windows (N, length) of the byte string (the tail is dropped)."""
    a = np.frombuffer(data, np.uint8)
    n = a.size // length
    return a[: n * length].reshape(n, length).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Metrics


def gain_kept(loss_pre: Any, loss_ft: Any, loss_merged: Any) -> np.ndarray:
    """Share of the fine-tuning gain kept, (L_pre − L_merged) / (L_pre − L_ft), elementwise.

    1 where the merged model matches the fine-tuned one, 0 where it is no better than θ0,
    negative where it is worse than θ0. NaN where fine-tuning gained nothing (L_pre = L_ft).
    """
    pre, ft, m = (np.asarray(v, np.float64) for v in (loss_pre, loss_ft, loss_merged))
    gain = pre - ft
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gain != 0, (pre - m) / np.where(gain != 0, gain, 1.0), np.nan)


# ---------------------------------------------------------------------------------------------
# Model


class Block(nn.Module):
    d_model: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, length, d = x.shape
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (
            nn.Dense(d, name=n)(h).reshape(b, length, self.heads, d // self.heads)
            for n in ("q", "k", "v")
        )
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads).astype(x.dtype)
        causal = jnp.tril(jnp.ones((length, length), bool))
        att = jax.nn.softmax(jnp.where(causal, att, jnp.finfo(att.dtype).min), axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, length, d)
        x = x + nn.Dense(d, name="o")(y)
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(d, name="down")(nn.gelu(nn.Dense(4 * d, name="up")(h)))


class ByteLM(nn.Module):
    """Causal byte-level transformer: (B, L) int bytes -> (B, L, 256) logits."""

    d_model: int = 64
    layers: int = 2
    heads: int = 4
    max_len: int = 64

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(256, self.d_model, name="embed")(tokens)
        pos = self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.d_model))
        x = x + pos[: tokens.shape[-1]].astype(x.dtype)
        for i in range(self.layers):
            x = Block(self.d_model, self.heads, name=f"block{i}")(x)
        return nn.Dense(256, name="head")(nn.LayerNorm(name="ln_f")(x))


@dataclasses.dataclass(frozen=True)
class LogitsFn:
    """``logits_fn(params, x) -> (B, L, 256)`` for jmerge's curvature functions (hashable)."""

    model: ByteLM

    def __call__(self, params: PyTree, x: jax.Array) -> jax.Array:
        return self.model.apply(params, x)


@functools.partial(jax.jit, static_argnames=("model",))
def _mean_loss(model: ByteLM, params: PyTree, seqs: jax.Array) -> jax.Array:
    logits = model.apply(params, seqs[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, seqs[:, 1:]).mean()


def mean_loss(model: ByteLM, params: PyTree, seqs: np.ndarray) -> float:
    """Mean next-byte cross-entropy (nats) over windows (N, L+1)."""
    return float(_mean_loss(model, params, jnp.asarray(seqs)))


@functools.partial(jax.jit, static_argnames=("model", "opt", "steps"))
def _fit_chunk(model, opt, steps, params, state, data, starts):
    length = model.max_len + 1

    def step(carry, s):
        p, st = carry
        batch = jax.vmap(lambda i: jax.lax.dynamic_slice(data, (i,), (length,)))(s)
        loss, g = jax.value_and_grad(
            lambda p: optax.softmax_cross_entropy_with_integer_labels(
                model.apply(p, batch[:, :-1]), batch[:, 1:]
            ).mean()
        )(p)
        upd, st = opt.update(g, st, p)
        return (optax.apply_updates(p, upd), st), loss

    (params, state), losses = jax.lax.scan(step, (params, state), starts.reshape(steps, -1))
    return params, state, losses


@functools.lru_cache(maxsize=16)
def _optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    # One object per (lr, steps): the jitted training chunk is keyed by it.
    return optax.adam(
        optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps, lr / 10)
    )


def train_lm(
    model: ByteLM,
    params: PyTree,
    streams: Sequence[bytes],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> PyTree:
    """Adam (cosine decay, 10% warm-up) on random windows; each batch row draws its stream
    uniformly, then a uniform start in it (so a mixture of streams is weighted equally)."""
    data = np.concatenate([np.frombuffer(s, np.uint8) for s in streams]).astype(np.int32)
    offsets = np.cumsum([0] + [len(s) for s in streams])
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(streams), steps * batch_size)
    room = np.array([len(s) - model.max_len - 1 for s in streams])
    starts = offsets[which] + (rng.random(steps * batch_size) * room[which]).astype(np.int64)
    opt = _optimizer(lr, steps)
    state = opt.init(params)
    chunk = 50 if steps % 50 == 0 else steps
    for c in range(steps // chunk):
        s = starts[c * chunk * batch_size : (c + 1) * chunk * batch_size]
        params, state, _ = _fit_chunk(
            model, opt, chunk, params, state, jnp.asarray(data), jnp.asarray(s, jnp.int32)
        )
    return params


# ---------------------------------------------------------------------------------------------
# Sizes


class Config(NamedTuple):
    bytes_per_domain: int
    d_model: int
    layers: int
    seq: int
    batch: int
    pretrain_steps: int
    finetune_steps: int
    pretrain_lr: float
    finetune_lr: float
    curv_windows: int
    ta_alphas: tuple[float, ...]
    fisher_alphas: tuple[float, ...]
    ties: tuple[tuple[float, float], ...]
    dare: tuple[tuple[float, float], ...]
    regmean_alphas: tuple[float, ...]
    gm_alphas: tuple[float, ...]
    gm_diag_priors: tuple[float, ...]
    gm_mf_priors: tuple[float, ...]
    gm_mf_maxiter: int
    mats_curvatures: tuple[str, ...]
    mats_iters: tuple[int, ...]
    mats_dampings: tuple[float, ...]
    neg_alphas: tuple[float, ...]
    #: Gauss-Newton steps of output matching (jmerge.output_matching), from the closed-form
    #: Fisher merge, on the curvature windows.
    om_steps: tuple[int, ...] = (5, 10, 20)


FULL = Config(
    bytes_per_domain=200_000,
    d_model=64,
    layers=2,
    seq=64,
    batch=32,
    pretrain_steps=600,
    finetune_steps=150,
    pretrain_lr=3e-3,
    finetune_lr=1e-3,
    curv_windows=24,
    ta_alphas=(0.2, 0.3, 0.4, 0.5, 0.7, 1.0),
    fisher_alphas=(0.5, 1.0, 1.5),
    ties=tuple((d, a) for d in (0.2, 0.5) for a in (0.7, 1.0)),
    dare=tuple((d, a) for d in (0.3, 0.6) for a in (0.3, 0.5)),
    regmean_alphas=(0.9, 1.0),
    gm_alphas=(0.25, 0.5, 1.0),
    gm_diag_priors=(0.1, 1.0, 10.0),
    gm_mf_priors=(1e-2, 1e-1),
    gm_mf_maxiter=20,
    mats_curvatures=("diag", "kfac", "gram", "fisher_mf"),
    mats_iters=(0, 10, 50),
    mats_dampings=(1e-2,),
    neg_alphas=(0.25, 0.5, 1.0, 1.5, 2.0, 3.0),
)
QUICK = Config(
    bytes_per_domain=40_000,
    d_model=32,
    layers=1,
    seq=32,
    batch=16,
    pretrain_steps=200,
    finetune_steps=50,
    pretrain_lr=3e-3,
    finetune_lr=1e-3,
    curv_windows=16,
    ta_alphas=(0.3, 0.5, 1.0),
    fisher_alphas=(1.0,),
    ties=((0.2, 1.0),),
    dare=((0.5, 0.5),),
    regmean_alphas=(1.0,),
    gm_alphas=(0.5, 1.0),
    gm_diag_priors=(1.0,),
    gm_mf_priors=(1e-1,),
    gm_mf_maxiter=10,
    mats_curvatures=("diag", "kfac", "gram", "fisher_mf"),
    mats_iters=(0, 10),
    mats_dampings=(1e-2,),
    neg_alphas=(0.5, 1.0),
    om_steps=(5,),
)


# ---------------------------------------------------------------------------------------------
# Trained models (orbax cache)


class TextBench(NamedTuple):
    """One seed's suite: corpus windows, model, θ0, θ_d, and the losses of θ0 / θ_d."""

    seed: int
    cfg: Config
    domains: tuple[str, ...]
    model: ByteLM
    corpus: Corpus
    seqs: dict[str, dict[str, np.ndarray]]  # domain -> split -> (N, seq + 1)
    theta0: PyTree
    finetuned: list[PyTree]
    loss_pre: dict[str, np.ndarray]  # split -> (D,)
    loss_ft: dict[str, np.ndarray]  # split -> (D,) θ_d on its own domain

    def losses(self, params: PyTree, split: str) -> np.ndarray:
        """(D,) mean next-byte loss of ``params`` on each domain's split."""
        return np.array([mean_loss(self.model, params, self.seqs[d][split]) for d in self.domains])


def _cache_key(seed: int, cfg: Config, corpus: Corpus) -> str:
    digest = hashlib.sha1()
    for d in sorted(corpus.text):
        for k in SPLITS:
            digest.update(corpus.text[d][k])
    spec = json.dumps([seed, cfg[:9], digest.hexdigest(), "text-v1"])
    return f"text-s{seed}-{hashlib.sha1(spec.encode()).hexdigest()[:10]}"


def _save(tree: PyTree, path: Path) -> None:
    from jmerge.io.orbax import save_orbax

    try:
        save_orbax(tree, path, overwrite=True)
    except FileExistsError:
        # another run (e.g. the intermediate suite) wrote the same deterministic key first
        if not path.exists():
            raise


def _restore(path: Path, target: PyTree) -> PyTree:
    from jmerge.io.orbax import restore_orbax

    return restore_orbax(path, target)


def make_bench(
    seed: int,
    cfg: Config,
    cache: Path | None,
    *,
    sources: Mapping[str, Sequence[Source]] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[TextBench, bool]:
    """Build the corpus, pretrain θ0 on the mixture, fine-tune per domain (or restore)."""
    corpus = build_corpus(
        default_sources() if sources is None else sources, bytes_per_domain=cfg.bytes_per_domain
    )
    domains = tuple(corpus.text)
    model = ByteLM(cfg.d_model, cfg.layers, 4, cfg.seq)
    init = model.init(jax.random.key(seed), jnp.zeros((1, cfg.seq), jnp.int32))
    path = None if cache is None else cache / _cache_key(seed, cfg, corpus)
    hit = path is not None and path.exists()
    if hit:
        like = {"theta0": init, "finetuned": {d: init for d in domains}}
        r = _restore(path, like)
        theta0, finetuned = r["theta0"], [r["finetuned"][d] for d in domains]
    else:
        train = [corpus.text[d]["train"] for d in domains]
        t0 = time.perf_counter()
        theta0 = train_lm(
            model,
            init,
            train,
            steps=cfg.pretrain_steps,
            lr=cfg.pretrain_lr,
            batch_size=cfg.batch,
            seed=seed,
        )
        log(f"seed {seed}: pretrained θ0 in {time.perf_counter() - t0:.1f} s")
        finetuned = []
        for i, d in enumerate(domains):
            finetuned.append(
                train_lm(
                    model,
                    theta0,
                    [corpus.text[d]["train"]],
                    steps=cfg.finetune_steps,
                    lr=cfg.finetune_lr,
                    batch_size=cfg.batch,
                    seed=seed * 1000 + 17 + i,
                )
            )
        log(f"seed {seed}: fine-tuned {len(domains)} domains in {time.perf_counter() - t0:.1f} s")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            _save({"theta0": theta0, "finetuned": dict(zip(domains, finetuned, strict=True))}, path)
    seqs = {d: {k: windows(corpus.text[d][k], cfg.seq + 1) for k in SPLITS} for d in domains}
    b = TextBench(seed, cfg, domains, model, corpus, seqs, theta0, finetuned, {}, {})
    for split in ("val", "test"):
        b.loss_pre[split] = b.losses(theta0, split)
        b.loss_ft[split] = np.array(
            [mean_loss(model, p, seqs[d][split]) for d, p in zip(domains, finetuned, strict=True)]
        )
    return b, hit


# ---------------------------------------------------------------------------------------------
# Curvatures


class Curv(NamedTuple):
    """Per fine-tuned model: sampled diagonal Fisher and operators; θ0's prior Fisher."""

    fisher: list[PyTree]
    ops: dict[str, list[Any]]
    fisher0: PyTree
    n0: float
    sizes: list[float]
    inputs: list[Any] | None = None  # each model's curvature inputs (output matching's data)
    logits: Callable | None = None  # the logits function the curvatures were computed with


def _zero_where(tree: PyTree, keys: set[str]) -> PyTree:
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if jax.tree_util.keystr(p) in keys else x, tree
    )


def compute_curvatures(
    logits: Callable,
    finetuned: Sequence[PyTree],
    inputs: Sequence[jax.Array],
    *,
    kinds: Sequence[str],
    seed: int,
    theta0: PyTree,
    inputs0: jax.Array,
    n0: float,
    sizes: Sequence[float],
    kind: str = "sampled",
) -> Curv:
    """Curvatures of each θ_t on ``inputs[t]`` (``kind`` diagonal Fisher, and the operators
    ``kinds`` ⊆ {diag, gram, kfac, fisher_mf}), and θ0's sampled Fisher on ``inputs0``.

    K-FAC covers the Dense kernels; its other leaves take the diagonal Fisher. The matrix-free
    Fisher carries the diagonal Fisher as its Jacobi preconditioner."""
    from jmerge import curvature as jc

    ops: dict[str, list] = {k: [] for k in kinds}
    fisher = []
    for i, (p, x) in enumerate(zip(finetuned, inputs, strict=True)):
        key = jax.random.key(seed * 100 + i)
        f = jc.fisher_diag(logits, p, x, kind=kind, key=key)
        fisher.append(f)
        if "diag" in kinds:
            ops["diag"].append(jc.Diagonal(f))
        if "gram" in kinds:
            ops["gram"].append(jc.gram(logits, p, x, normalize="mean"))
        if "kfac" in kinds:
            k = jc.kfac_factors(logits, p, x, kind=kind, key=key, rest=0.0)
            ops["kfac"].append(jc.Sum((k, jc.Diagonal(_zero_where(f, set(k.factors))))))
        if "fisher_mf" in kinds:
            op = jc.fisher_operator(logits, p, x)
            ops["fisher_mf"].append(jc.MatrixFree(op.mv_fn, diag_tree=f, operands=op.operands))
    f0 = jc.fisher_diag(logits, theta0, inputs0, kind="sampled", key=jax.random.key(seed))
    return Curv(fisher, ops, f0, float(n0), [float(s) for s in sizes], list(inputs), logits)


def text_curvatures(b: TextBench, models: Sequence[PyTree], domains: Sequence[str]) -> Curv:
    """:func:`compute_curvatures` for ``models`` fine-tuned on ``domains`` of bench ``b``."""
    cfg, n = b.cfg, b.cfg.curv_windows
    inputs = []
    for i, d in enumerate(domains):
        tr = b.seqs[d]["train"]
        idx = np.sort(np.random.default_rng([b.seed, i, 3]).permutation(tr.shape[0])[:n])
        inputs.append(jnp.asarray(tr[idx, :-1]))
    mix = np.concatenate([b.seqs[d]["train"] for d in b.domains])
    idx = np.random.default_rng([b.seed, 5]).permutation(mix.shape[0])[: 2 * n]
    return compute_curvatures(
        LogitsFn(b.model),
        models,
        inputs,
        kinds=cfg.mats_curvatures,
        seed=b.seed,
        theta0=b.theta0,
        inputs0=jnp.asarray(mix[idx, :-1]),
        n0=float(mix.shape[0]),
        sizes=[float(b.seqs[d]["train"].shape[0]) for d in domains],
    )


# ---------------------------------------------------------------------------------------------
# Methods (shared with the intermediate-task suite)


Score = Callable[[PyTree], tuple[float, float, Mapping[str, Any]]]


# Module-level jitted merges: one compilation serves every seed, weight and grid point (the
# hyperparameters are traced arguments; only the exclusion rule and the CG budget are static).


@functools.partial(jax.jit, static_argnames=("exclude",))
def _ta(p0, ft, alpha, exclude):
    return jmerge.task_arithmetic(p0, ft, alpha, exclude=exclude)


@functools.partial(jax.jit, static_argnames=("exclude", "maxiter"))
def _gm(p0, ft, curvatures, alpha, prior, sizes, *, exclude, maxiter):
    return jmerge.gradient_matching(
        p0, ft, curvatures, alpha=alpha, prior=prior, dataset_sizes=sizes, maxiter=maxiter,
        exclude=exclude,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("logits", "exclude", "steps"))
def _om(p0, ft, inputs, init, weights, *, logits, exclude, steps):
    return jmerge.output_matching(
        logits, p0, ft, inputs, init=init, weights=weights, exclude=exclude, steps=steps
    )


@functools.partial(jax.jit, static_argnames=("exclude", "maxiter"))
def _mats(p0, ft, curvatures, init, damping, weights, *, exclude, maxiter):
    return jmerge.mats(
        p0, ft, curvatures, init=init, damping=damping, weights=weights, maxiter=maxiter,
        rtol=1e-6, exclude=exclude,
    )  # fmt: skip


def run_methods(
    p0: PyTree,
    ft: Sequence[PyTree],
    curv: Curv,
    cfg: Any,
    score: Score,
    *,
    weights: Sequence[float] | None = None,
    exclude: str | None = None,
    seed: int = 0,
) -> list[Candidate]:
    """Every method at every grid point of ``cfg``, scored by ``score(params) -> (val, test,
    extra)`` (higher is better).

    ``weights`` w_t (default all 1) weight the models: the α of task arithmetic, TIES, DARE and
    gradient matching is α·w_t; average, Fisher merging, RegMean and MaTS take w_t as their
    weights. MaTS starts from task arithmetic at its validation-chosen α (with the same
    weights); the ``diag`` row is the CG solve of the closed-form Fisher merge's system.
    """
    w = jnp.asarray([1.0] * len(ft) if weights is None else weights, jnp.float32)
    out: list[Candidate] = []

    def add(method: str, setting: dict, result: Any) -> None:
        params = getattr(result, "params", result)
        va, te, extra = score(params)
        extra = dict(extra)
        info = getattr(result, "info", None)
        if info is not None and hasattr(info, "num_steps"):
            extra["cg_steps"] = int(info.num_steps)
            extra["converged"] = bool(info.converged)
            extra["residual"] = float(info.residual_norm)
        if info is not None:
            extra["objective"] = float(info.objective)
            extra["objective_init"] = float(info.objective_init)
        out.append(Candidate(method, setting, va, te, extra))

    kw = {"exclude": exclude}
    sizes = jnp.asarray(curv.sizes, jnp.float32)
    add("average", {}, jmerge.average(ft, w, pretrained=p0, **kw))
    for a in cfg.ta_alphas:
        add("task_arith", {"a": a}, _ta(p0, ft, a * w, exclude))
    # TIES scales the merged task vector by one α: the weights scale the task vectors first.
    ft_w = (
        ft
        if weights is None
        else [
            jax.tree.map(lambda x, y, s=s: x + s * (y - x), p0, f)
            for f, s in zip(ft, weights, strict=True)
        ]
    )
    for d, a in cfg.ties:
        add("ties", {"d": d, "a": a}, jmerge.ties(p0, ft_w, density=d, alpha=a, **kw))
    for d, a in cfg.dare:
        key = jax.random.key(seed)
        add("dare", {"d": d, "a": a}, jmerge.dare(p0, ft, density=d, key=key, alpha=a * w, **kw))
    fm = jmerge.fisher_merge(ft, curv.fisher, weights=w, pretrained=p0, **kw)
    for a in cfg.fisher_alphas:
        add("fisher", {"a": a}, jax.tree.map(lambda x, y, a=a: x + a * (y - x), p0, fm))
    if "gram" in curv.ops:
        for a in cfg.regmean_alphas:
            merged = jmerge.regmean(ft, curv.ops["gram"], alpha=a, weights=w, pretrained=p0, **kw)
            add("regmean", {"offdiag": a}, merged)

    for c in cfg.gm_diag_priors:
        prior = jax.tree.map(lambda x, c=c: c * curv.n0 * x, curv.fisher0)
        for a in cfg.gm_alphas:
            res = _gm(p0, ft, curv.fisher, a * w, prior, sizes, exclude=exclude, maxiter=100)
            add("gradmatch_diag", {"a": a, "c": c}, res)
    if "fisher_mf" in curv.ops:
        for d in cfg.gm_mf_priors:
            for a in cfg.gm_alphas:
                res = _gm(
                    p0, ft, curv.ops["fisher_mf"], a * w, jnp.float32(d), sizes,
                    exclude=exclude, maxiter=cfg.gm_mf_maxiter,
                )  # fmt: skip
                add("gradmatch_mf", {"a": a, "prior": d}, res)

    a_ta = best_per_method([c for c in out if c.method == "task_arith"])["task_arith"]
    init = _ta(p0, ft, a_ta.setting["a"] * w, exclude)
    for kind in cfg.mats_curvatures:
        for damp in cfg.mats_dampings:
            for k in cfg.mats_iters:
                # zero iterations: the initialisation itself (no solve to compile)
                res = init
                if k > 0:
                    res = _mats(
                        p0, ft, curv.ops[kind], init, jnp.float32(damp), w,
                        exclude=exclude, maxiter=k,
                    )  # fmt: skip
                add(f"mats_{kind}", {"damp": damp, "iters": k}, res)
    # Output matching: the KL objective itself (no quadratic model), from the closed-form
    # Fisher merge, on the curvature inputs, the models weighted by w.
    if curv.logits is not None and curv.inputs is not None:
        for k in getattr(cfg, "om_steps", ()):
            res = _om(
                p0, ft, list(curv.inputs), fm, w / jnp.sum(w),
                logits=curv.logits, exclude=exclude, steps=k,
            )  # fmt: skip
            add("output_match", {"steps": k}, res)
    return out


# ---------------------------------------------------------------------------------------------
# Diagnostics: does the merges' quadratic model hold where they land?


@functools.partial(jax.jit, static_argnames=("model",))
def _kl_sum(model: ByteLM, p_t: PyTree, p_m: PyTree, x: jax.Array) -> jax.Array:
    lt = jax.nn.log_softmax(model.apply(p_t, x))
    lm = jax.nn.log_softmax(model.apply(p_m, x))
    return jnp.mean(jnp.sum(jnp.exp(lt) * (lt - lm), (-2, -1)))


def kl_over_quadratic(b: TextBench, merged: PyTree, inputs: Sequence[jax.Array]) -> list[float]:
    """Per domain t: KL(p_θt ‖ p_merged) (summed over a window's tokens, mean over windows of
    ``inputs[t]``) divided by its quadratic model ½ (θ − θ_t)ᵀ F_t (θ − θ_t), F_t the Fisher at
    θ_t on the same windows (the curvature MaTS and Fisher merging minimise). 1 where the
    quadratic model holds at the merged point; larger where the merge left its region."""
    import optax.tree_utils as otu

    from jmerge import curvature as jc

    out = []
    for p, x in zip(b.finetuned, inputs, strict=True):
        d = jax.tree.map(jnp.subtract, merged, p)
        quad = 0.5 * float(otu.tree_vdot(d, jc.fisher_operator(LogitsFn(b.model), p, x).mv(d)))
        out.append(float(_kl_sum(b.model, p, merged, x)) / quad if quad > 0 else float("nan"))
    return out


def diagnose(seed: int, cfg: Config, cache: Path | None, a_ta: float) -> list[str]:
    """Why MaTS with CG does what it does here: along CG iterations from task arithmetic (α =
    ``a_ta``), the quadratic objective (``info.objective``), the validation gain share, and the
    KL / quadratic-model ratio per domain, for each curvature; and the same numbers for the
    closed-form Fisher merge and task arithmetic."""
    b, _ = make_bench(seed, cfg, cache, log=lambda s: None)
    curv = text_curvatures(b, b.finetuned, b.domains)
    n = cfg.curv_windows
    inputs = []
    for i, d in enumerate(b.domains):
        tr = b.seqs[d]["train"]
        idx = np.sort(np.random.default_rng([b.seed, i, 3]).permutation(tr.shape[0])[:n])
        inputs.append(jnp.asarray(tr[idx, :-1]))

    def kept(params):
        return float(gain_kept(b.loss_pre["val"], b.loss_ft["val"], b.losses(params, "val")).mean())

    def line(name, params, obj=""):
        r = kl_over_quadratic(b, params, inputs)
        return f"{name:28s} val kept {kept(params):+.3f} {obj} KL/quad per domain " + " ".join(
            f"{v:.2f}" for v in r
        )

    t = len(b.finetuned)
    init = jmerge.task_arithmetic(b.theta0, b.finetuned, a_ta)
    lines = [line(f"task_arith a={a_ta:g}", init)]
    lines.append(line("fisher (closed form)", jmerge.fisher_merge(b.finetuned, curv.fisher)))
    lines.append(line("average", jmerge.average(b.finetuned)))
    for kind in cfg.mats_curvatures:
        for k in (10, 50):
            res = jmerge.mats(
                b.theta0, b.finetuned, curv.ops[kind], init=init, weights=[1.0] * t, maxiter=k,
                damping=1e-2,
            )  # fmt: skip
            info = res.info
            obj = f"objective {float(info.objective):.3g} (init {float(info.objective_init):.3g})"
            lines.append(line(f"mats_{kind} δ=1e-2 iters={k}", res.params, obj))
    return lines


# ---------------------------------------------------------------------------------------------
# One seed


class SeedResult(NamedTuple):
    seed: int
    domains: tuple[str, ...]
    loss_pre: list[float]  # test
    loss_ft: list[float]  # test
    candidates: list[Candidate]
    negation: dict[str, list[dict]]  # domain -> [{alpha, val/test forget, control}]
    seconds: dict[str, float]


def negation_rows(b: TextBench) -> dict[str, list[dict]]:
    """θ0 − α τ_d for every domain d and α: forgetting on d and the controls' loss change,
    both in units of the domain's fine-tuning gain and in nats (val and test)."""
    neg = jax.jit(lambda p, f, a: jmerge.negation(p, [f], a))
    out = {}
    for i, d in enumerate(b.domains):
        rows = []
        for a in b.cfg.neg_alphas:
            p = neg(b.theta0, b.finetuned[i], a)
            row: dict[str, Any] = {"alpha": a}
            for split in ("val", "test"):
                pre, ft = b.loss_pre[split], b.loss_ft[split]
                loss = b.losses(p, split)
                kept = gain_kept(pre, ft, loss)
                others = [j for j in range(len(b.domains)) if j != i]
                row[f"{split}_forget"] = float(-kept[i])
                row[f"{split}_forget_nats"] = float(loss[i] - pre[i])
                row[f"{split}_control_kept"] = float(np.mean(kept[others]))
                row[f"{split}_control_rel"] = float(np.mean(loss[others] / pre[others] - 1))
            rows.append(row)
        out[d] = rows
    return out


def choose_negation(rows: Sequence[dict], tolerance: float = 0.05) -> dict:
    """The row of largest validation forgetting whose controls' validation loss is within
    ``tolerance`` (relative) of θ0's; the smallest α if none is."""
    ok = [r for r in rows if r["val_control_rel"] <= tolerance]
    if not ok:
        return min(rows, key=lambda r: r["alpha"])
    return max(ok, key=lambda r: r["val_forget"])


def run_seed(seed: int, cfg: Config, cache: Path | None, log: Callable[[str], None] = print):
    t0 = time.perf_counter()
    b, hit = make_bench(seed, cfg, cache, log=log)
    if seed == 0:
        for line in b.corpus.report:
            log(f"corpus: {line}")
    t1 = time.perf_counter()
    curv = text_curvatures(b, b.finetuned, b.domains)
    t2 = time.perf_counter()

    def score(params):
        va = gain_kept(b.loss_pre["val"], b.loss_ft["val"], b.losses(params, "val"))
        te = gain_kept(b.loss_pre["test"], b.loss_ft["test"], b.losses(params, "test"))
        return float(va.mean()), float(te.mean()), {"per_domain": [float(v) for v in te]}

    cands = run_methods(b.theta0, b.finetuned, curv, cfg, score, seed=seed)
    t3 = time.perf_counter()
    neg = negation_rows(b)
    return SeedResult(
        seed,
        b.domains,
        [float(v) for v in b.loss_pre["test"]],
        [float(v) for v in b.loss_ft["test"]],
        cands,
        neg,
        {"train": t1 - t0, "cache_hit": float(hit), "curvature": t2 - t1, "merge": t3 - t2},
    )


# ---------------------------------------------------------------------------------------------
# Reports


def summarize(results: Sequence[SeedResult], *, markdown: bool = False) -> str:
    """Per method at its validation-chosen setting: per-domain share of gain kept (test, mean
    over seeds), its mean over domains (mean ± std over seeds), the settings per seed."""
    domains = results[0].domains
    bests = [best_per_method(r.candidates) for r in results]
    rows = []
    for method in bests[0]:
        chosen = [bp[method] for bp in bests]
        per = [np.mean([c.extra["per_domain"][i] for c in chosen]) for i in range(len(domains))]
        m, s = mean_std([c.test for c in chosen])
        settings = " / ".join(format_setting(c.setting) or "-" for c in chosen)
        rows.append([method, *[f"{v:.3f}" for v in per], f"{m:.3f} ± {s:.3f}", settings])
    header = ["method", *domains, "mean kept (test)", "val-chosen (per seed)"]
    return table(header, rows, markdown=markdown)


def summarize_negation(results: Sequence[SeedResult], *, markdown: bool = False) -> str:
    domains = results[0].domains
    rows = []
    for d in domains:
        chosen = [choose_negation(r.negation[d]) for r in results]
        rows.append(
            [
                d,
                " / ".join(f"{c['alpha']:g}" for c in chosen),
                f"{np.mean([c['test_forget'] for c in chosen]):.2f} ± "
                f"{np.std([c['test_forget'] for c in chosen]):.2f}",
                f"{np.mean([c['test_forget_nats'] for c in chosen]):+.3f}",
                f"{np.mean([c['test_control_rel'] for c in chosen]) * 100:+.1f}%",
                f"{np.mean([c['test_control_kept'] for c in chosen]):+.3f}",
            ]
        )
    header = [
        "negated",
        "α (val)",
        "forgetting (gain units)",
        "ΔL on it (nats)",
        "controls ΔL/L0",
        "controls' gain kept",
    ]
    return table(header, rows, markdown=markdown)


def claims(results: Sequence[SeedResult]) -> list[str]:
    bests = [best_per_method(r.candidates) for r in results]

    def chosen(m):
        return float(np.mean([bp[m].test for bp in bests])) if m in bests[0] else float("nan")

    merges = {m: chosen(m) for m in bests[0]}
    order = sorted(merges, key=merges.get, reverse=True)
    lines = ["ranking (mean gain kept, test): " + ", ".join(f"{m} {merges[m]:.3f}" for m in order)]
    ta, gm = chosen("task_arith"), chosen("gradmatch_diag")
    lines.append(
        f"(a) gradient matching (diag) {gm:.3f} vs task arithmetic {ta:.3f}: "
        f"{'HOLDS' if gm > ta else 'FAILS'}"
    )
    # zero CG iterations is MaTS's task-arithmetic initialisation: (b) takes iters ≥ 1 only
    cg = {}
    for m in merges:
        if m.startswith("mats_") and m != "mats_diag":
            picks = [
                select_by_validation(
                    [c for c in r.candidates if c.method == m and c.setting["iters"] > 0]
                )
                for r in results
            ]
            cg[m] = (float(np.mean([c.test for c in picks])), picks)
    if cg:
        m = max(cg, key=lambda k: cg[k][0])
        f, rm = chosen("fisher"), chosen("regmean")
        lines.append(
            f"(b) best MaTS with CG (iters ≥ 1; {m}) {cg[m][0]:.3f} vs Fisher merging {f:.3f} "
            f"and RegMean {rm:.3f}: {'HOLDS' if cg[m][0] > max(f, rm) else 'FAILS'}; "
            "per curvature (val-chosen δ, iters): "
            + ", ".join(
                f"{k[5:]} {v:.3f} ({' / '.join(format_setting(c.setting) for c in p)})"
                for k, (v, p) in cg.items()
            )
        )
    if "output_match" in merges:
        quad = {m: v for m, v in merges.items() if m.startswith(("mats_", "regmean", "fisher"))}
        bq = max(quad, key=quad.get)
        om = merges["output_match"]
        lines.append(
            f"(c) output matching (Gauss-Newton on the KL) {om:.3f} vs the best quadratic-model "
            f"merge ({bq}) {quad[bq]:.3f}: {'HOLDS' if om > quad[bq] else 'FAILS'}"
        )
    return lines


def load_json(path: Path) -> list[SeedResult]:
    """Results saved by :func:`main` (``--report`` reprints their tables)."""
    with open(path) as fh:
        raw = json.load(fh)
    keys = ("method", "setting", "val", "test")
    return [
        SeedResult(
            d["seed"],
            tuple(d["domains"]),
            d["loss_pre"],
            d["loss_ft"],
            [
                Candidate(
                    c["method"],
                    c["setting"],
                    c["val"],
                    c["test"],
                    {k: v for k, v in c.items() if k not in keys},
                )
                for c in d["candidates"]
            ],
            d["negation"],
            d["seconds"],
        )  # fmt: skip
        for d in raw
    ]


def _curve(results, method, x, fixed):
    xs = sorted({c.setting[x] for c in results[0].candidates if c.method == method and fixed(c)})
    ys = [
        [
            next(
                c.test
                for c in r.candidates
                if c.method == method and c.setting[x] == v and fixed(c)
            )
            for r in results
        ]
        for v in xs
    ]
    return xs, [float(np.mean(y)) for y in ys], [float(np.std(y)) for y in ys]


def make_plots(results: Sequence[SeedResult], out: Path, tag: str) -> list[Path]:
    best = best_per_method(results[0].candidates)
    curves = {
        "task arithmetic": _curve(results, "task_arith", "a", lambda c: True),
        "Fisher merging, θ0 + α(θ_F − θ0)": _curve(results, "fisher", "a", lambda c: True),
    }
    for m, key in (("gradmatch_diag", "c"), ("gradmatch_mf", "prior")):
        if m in best:
            v = best[m].setting[key]
            curves[f"{m} ({key}={v:g})"] = _curve(
                results, m, "a", lambda c, v=v, key=key: c.setting[key] == v
            )
    paths = [
        plot_curves(
            out / f"{tag}_alpha.png",
            curves,
            xlabel="α",
            ylabel="share of fine-tuning gain kept (test)",
            title="text: merging 4 domains, robustness to α",
            reference={"fine-tuned": 1.0, "θ0": 0.0},
        )
    ]
    curves = {}
    for d in results[0].domains:
        xs = [r["alpha"] for r in results[0].negation[d]]
        for key, label in (("test_forget", "forgetting"), ("test_control_kept", "controls kept")):
            ys = np.array([[row[key] for row in r.negation[d]] for r in results])
            curves[f"{d}: {label}"] = (xs, ys.mean(0), ys.std(0))
    paths.append(
        plot_curves(
            out / f"{tag}_negation.png",
            curves,
            xlabel="α (θ0 − α τ_d)",
            ylabel="gain units (test)",
            title="text: task negation",
            reference={"0": 0.0},
        )
    )
    curves = {}
    for m in best:
        if m.startswith("mats_"):
            dmp = best[m].setting["damp"]
            curves[f"{m[5:]} (δ={dmp:g})"] = _curve(
                results, m, "iters", lambda c, dmp=dmp: c.setting["damp"] == dmp
            )
    paths.append(
        plot_curves(
            out / f"{tag}_cg.png",
            curves,
            xlabel="CG iterations",
            ylabel="share of fine-tuning gain kept (test)",
            title="text: MaTS against CG iterations (init: task arithmetic)",
            logx=True,
        )
    )
    return paths


def _jsonable(r: SeedResult) -> dict:
    d = r._asdict()
    d["candidates"] = [
        {"method": c.method, "setting": dict(c.setting), "val": c.val, "test": c.test, **c.extra}
        for c in r.candidates
    ]
    return d


def default_cache() -> str:
    return os.environ.get("JMERGE_CACHE", str(Path.home() / ".cache" / "jmerge" / "quality"))


def use_compilation_cache(cache: Path | None) -> None:
    """Keep XLA executables under ``cache/xla`` so that reruns skip compilation."""
    if cache is not None:
        jax.config.update("jax_compilation_cache_dir", str(cache / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one seed (CI)")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--cache", default=default_cache(), help="orbax cache ('' disables)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--out", default=str(RESULTS), help="folder for PNG, JSON, markdown")
    parser.add_argument("--markdown", action="store_true", help="markdown tables")
    parser.add_argument(
        "--diagnose",
        type=float,
        default=None,
        metavar="ALPHA",
        help="only print diagnose() for seed 0, CG from task arithmetic at ALPHA",
    )
    parser.add_argument("--report", default=None, help="reprint tables from a saved JSON")
    args = parser.parse_args(argv)
    if args.report:
        results = load_json(Path(args.report))
        print(summarize(results, markdown=args.markdown))
        print(summarize_negation(results, markdown=args.markdown))
        print("\n".join(claims(results)))
        return 0
    cfg = QUICK if args.quick else FULL
    seeds = range(args.seeds or (1 if args.quick else 3))
    cache = Path(args.cache) if args.cache else None
    out = Path(args.out)
    use_compilation_cache(cache)
    if args.diagnose is not None:
        print("\n".join(diagnose(0, cfg, cache, args.diagnose)))
        return 0
    start = time.perf_counter()
    tag = f"text{'_quick' if args.quick else ''}"
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for s in seeds:
        results.append(run_seed(s, cfg, cache))
        # partial results after each seed, so that a later failure loses nothing
        with open(out / f"{tag}.json", "w") as fh:
            json.dump([_jsonable(r) for r in results], fh, indent=1)
        print(summarize(results), flush=True)
    lines = [
        f"## text, {'quick' if args.quick else 'full'}; domains {', '.join(results[0].domains)}; "
        f"seeds {list(seeds)}; model d={cfg.d_model}, layers={cfg.layers}, seq={cfg.seq}",
        "test loss (nats/byte, mean over seeds): θ0 "
        + ", ".join(
            f"{d} {np.mean([r.loss_pre[i] for r in results]):.3f}"
            for i, d in enumerate(results[0].domains)
        )
        + "; fine-tuned "
        + ", ".join(
            f"{d} {np.mean([r.loss_ft[i] for r in results]):.3f}"
            for i, d in enumerate(results[0].domains)
        ),
        "",
        "share of each domain's fine-tuning gain kept, (L0 − L_merge)/(L0 − L_ft), test; "
        "settings chosen on validation",
        "",
        summarize(results, markdown=args.markdown),
        "",
        "task negation θ0 − α τ_d (α: largest validation forgetting with controls' loss ≤ 1.05 L0)",
        "",
        summarize_negation(results, markdown=args.markdown),
        "",
        *claims(results),
    ]
    for r in results:
        s = r.seconds
        lines.append(
            f"seed {r.seed}: train {s['train']:.1f} s{' (cache)' if s['cache_hit'] else ''}, "
            f"curvature {s['curvature']:.1f} s, merges {s['merge']:.1f} s "
            f"({len(r.candidates)} merges)"
        )
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    if args.markdown:
        (out / f"{tag}.md").write_text(text + "\n")
    if not args.no_plots:
        for p in make_plots(results, out, tag):
            print(f"plot: {p}")
    with open(out / f"{tag}.json", "w") as fh:
        json.dump([_jsonable(r) for r in results], fh, indent=1)
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
