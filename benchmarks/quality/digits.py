"""Digits suite: every merge side by side on scikit-learn's 8×8 digits, settings chosen on
validation, results on test, several seeds (issue 12, items 1, 5, 6).

Data. The 1797 images, scaled to [0, 1], split per seed (stratified) into train 60% /
validation 20% / test 20%.

Tasks (per-task heads kept unmerged: every merge has ``exclude=r"head"``, and a merged
backbone is evaluated on task t with θ_t's own head). Input tasks transform the image:
``rot90``, ``flip_ud``, ``invert``, ``permute`` (a fixed pixel permutation), ``noise``
(fixed Gaussian noise, σ = 0.3); label tasks keep the image and change the labels:
``parity`` (y mod 2), ``gt4`` (y > 4), ``relabel`` (a fixed permutation of the ten digits).
``--quick`` uses six of them (rot90, invert, permute, noise, parity, gt4).

θ0 is pretrained on a broad mixture that is not the tasks' own data: every plain training
image plus a share (:data:`MIX_SHARE` of the training set each) of eight other views
(rot180, rot270, flip_lr, transpose, a one-pixel shift, a blur, another pixel permutation,
weak noise), with the digit labels, so that fine-tuning moves little (task vectors small
against θ0) while θ0 stays clearly below the fine-tuned models. θ_t fine-tunes every parameter
of θ0 on task t; the multitask upper bound trains one backbone jointly on all tasks (one head
each) from θ0.

Curvatures, each at θ_t on ``curv_examples`` training examples of task t: diagonal Fisher
(exact, and sampled labels for gradient matching's recipe), RegMean's input Grams, K-FAC
factors (exact Fisher; the leaves without factors — biases, LayerNorm, convolutions — take
the exact diagonal Fisher), the matrix-free Fisher and GGN (``fisher_operator``,
``ggn_operator``; for softmax cross-entropy the two are equal, a check), and θ0's sampled
diagonal Fisher on the pretraining mixture (gradient matching's prior).

Methods, each with a grid whose best point on the *validation* split is reported on *test*
(:func:`benchmarks.quality._common.select_by_validation`): average; task arithmetic (α);
TIES (density, α); DARE (density, α); Fisher merging (exact diagonal; scaled along its task
vector, θ0 + α (θ_F − θ0), α = 1 is plain Fisher merging); RegMean (off-diagonal scale);
MaTS with curvature diag / K-FAC / Gram / matrix-free Fisher / matrix-free GGN, from the inits
task arithmetic (at its chosen α), average and closed-form Fisher, for CG iterations 0 to
``maxiter`` and damping δ (relative) towards θ0 (rows ``mats_<kind>``), and as a trust region
around the init (rows ``mats_<kind>_tr``: ``damping_anchor="init"``, δ relative to the mean
curvature diagonal); gradient matching diagonal with the paper's recipe
(sampled-label Fisher, H_t = N_t F_t, prior H0 = c · N_0 F_0 from θ0's Fisher; α, c) and
matrix-free (H_t = N_t · Fisher operator, prior relative isotropic δ; α, δ).

Diagnostics per suite: ‖τ_t‖/‖θ0‖ over the backbone (mean over tasks), and for each method at
its chosen setting the ratio Σ_t KL(p_θt ‖ p_merge) / Σ_t ½ (θ − θ_t)ᵀ F_t (θ − θ_t) of the
true KL on task t's curvature examples to its quadratic model (F_t the exact Fisher at θ_t):
1 where the merges' quadratic model holds, larger where the merge left its region.

Fine-tuned checkpoints are cached with orbax under ``--cache`` (default
``~/.cache/jmerge/quality``); a rerun with the same sizes skips training.

Run: ``python -m benchmarks.quality.digits [--quick] [--backbone mlp|cnn|vit|all]
[--seeds N] [--first-seed S] [--grid quick|full] [--no-plots]``; ``--combine A.json B.json``
reports over runs split by seed; ``--tr-sweep`` runs only the MaTS trust-region × curvature
examples sweep (KL/quadratic ratio on one yardstick).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from benchmarks.quality._common import (
    RESULTS,
    Candidate,
    best_per_method,
    format_setting,
    mean_std,
    plot_curves,
    table,
)
from jmerge.examples import digits as dx

PyTree = Any
HEAD = r"head"
MIX_SHARE = 0.25
ALL_TASKS = ("rot90", "flip_ud", "invert", "permute", "noise", "parity", "gt4", "relabel")
QUICK_TASKS = ("rot90", "invert", "permute", "noise", "parity", "gt4")
_RELABEL = np.random.default_rng(77).permutation(10).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Data and tasks


def _img(x):
    return x.reshape(-1, 8, 8)


def _flat(x):
    return np.ascontiguousarray(x.reshape(x.shape[0], 64), dtype=np.float32)


def _blur(x):
    p = np.pad(_img(x), ((0, 0), (1, 1), (1, 1)))
    s = sum(p[:, i : i + 8, j : j + 8] for i in range(3) for j in range(3))
    return _flat(s / 9.0)


def _perm2(x):
    return np.ascontiguousarray(x[:, np.random.default_rng(99).permutation(64)])


def _weak_noise(x):
    rng = np.random.default_rng([55, *x.shape])
    return (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)


#: Pretraining views besides the plain one (none is a task's view).
MIX_VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rot180": lambda x: _flat(np.rot90(_img(x), 2, axes=(1, 2))),
    "rot270": lambda x: _flat(np.rot90(_img(x), 3, axes=(1, 2))),
    "flip_lr": lambda x: dx.view("flip_lr", x),
    "transpose": lambda x: dx.view("transpose", x),
    "shift": lambda x: _flat(np.roll(_img(x), 1, axis=2)),
    "blur": _blur,
    "perm2": _perm2,
    "weak_noise": _weak_noise,
}

#: Label tasks: the plain image with new labels.
LABEL_TASKS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "parity": lambda y: (y % 2).astype(np.int32),
    "gt4": lambda y: (y > 4).astype(np.int32),
    "relabel": lambda y: _RELABEL[y],
}


def task_xy(task: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Task ``task``'s inputs and labels for plain images ``x`` (N, 64) and digits ``y``."""
    if task in LABEL_TASKS:
        return dx.view("identity", x), LABEL_TASKS[task](y)
    return dx.view(task, x), np.asarray(y, np.int32)


class Split(NamedTuple):
    x: np.ndarray
    y: np.ndarray


@functools.lru_cache(maxsize=8)
def load_splits(seed: int) -> dict[str, Split]:
    """Stratified, seeded: fine-tuning train 40%, pretraining-only pool 20%, validation 20%,
    test 20% of the 1797 images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)

    def cut(a, b, share):
        return train_test_split(a, b, test_size=share, random_state=seed, stratify=b)

    x_a, x_te, y_a, y_te = cut(x, y, 0.2)
    x_b, x_va, y_b, y_va = cut(x_a, y_a, 0.25)
    x_tr, x_pool, y_tr, y_pool = cut(x_b, y_b, 1 / 3)
    return {
        "train": Split(x_tr, y_tr),
        "pool": Split(x_pool, y_pool),
        "val": Split(x_va, y_va),
        "test": Split(x_te, y_te),
    }


def pretrain_mixture(
    splits: dict[str, Split], tasks: Sequence[str], seed: int, task_views: bool = True
):
    """θ0's data: every plain image of train and pool with its digit, plus, for each of the
    views in :data:`MIX_VIEWS` and (with ``task_views``) each input task's view,
    ``MIX_SHARE`` of the pool images (the pool is never a task's training data)."""
    rng = np.random.default_rng([seed, 7])
    tr, pool = splits["train"], splits["pool"]
    xs, ys = [tr.x, pool.x], [tr.y, pool.y]
    k = int(MIX_SHARE * pool.x.shape[0])
    views = list(MIX_VIEWS.values()) + [
        functools.partial(dx.view, t) for t in tasks if task_views and t not in LABEL_TASKS
    ]
    for f in views:
        idx = rng.permutation(pool.x.shape[0])[:k]
        xs.append(f(pool.x[idx]))
        ys.append(pool.y[idx])
    return np.concatenate(xs), np.concatenate(ys)


# ---------------------------------------------------------------------------------------------
# Sizes


class Config(NamedTuple):
    tasks: tuple[str, ...]
    pretrain_steps: int
    finetune_steps: int
    finetune_lr: float
    multitask_steps: int
    curv_examples: int
    ta_alphas: tuple[float, ...]
    fisher_alphas: tuple[float, ...]
    gm_alphas: tuple[float, ...]
    gm_diag_priors: tuple[float, ...]
    gm_mf_alphas: tuple[float, ...]
    gm_mf_priors: tuple[float, ...]
    gm_mf_maxiter: int
    mats_curvatures: tuple[str, ...]
    mats_inits: tuple[str, ...]
    mats_iters: tuple[int, ...]
    mats_dampings: tuple[float, ...]
    mats_tr_iters: tuple[int, ...]
    mats_tr_dampings: tuple[float, ...]
    ties: tuple[tuple[float, float], ...]
    dare: tuple[tuple[float, float], ...]
    regmean_alphas: tuple[float, ...]
    #: "full": θ_t fine-tunes every parameter from θ0 (with θ0's head); "lp-ft": a linear
    #: probe of θ0's features first (head only, ``finetune_steps`` at 10× ``finetune_lr``),
    #: then every parameter from (θ0's backbone, the probe) — Kumar et al., ICLR 2022. The
    #: multitask model starts from the same probes.
    finetune: str = "full"
    #: Whether θ0's pretraining mixture has a share of each input task's view (pool images,
    #: never the tasks' training images); False: only the other views of MIX_VIEWS.
    pretrain_task_views: bool = True
    #: Output matching (jmerge.output_matching, the KL objective itself): Gauss-Newton steps,
    #: and Adam (lr 1e-3) steps on the same objective, each from the closed-form Fisher init.
    om_steps: tuple[int, ...] = (5, 10, 20, 40)
    om_adam_steps: tuple[int, ...] = (250, 500, 1000, 2000)


_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)
#: Full sizes. ``curv_examples`` 720 is every fine-tuning training image (40% of 1797): the
#: quick mode's 128 left the matrix-free merges' KL 20-600x their quadratic model.
FULL = Config(
    tasks=ALL_TASKS,
    pretrain_steps=2000,
    finetune_steps=400,
    finetune_lr=7e-4,
    multitask_steps=1500,
    curv_examples=720,
    ta_alphas=_ALPHAS,
    fisher_alphas=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5),
    gm_alphas=(0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0),
    gm_diag_priors=(0.1, 1.0, 10.0),
    gm_mf_alphas=(0.25, 0.5, 1.0, 2.0),
    gm_mf_priors=(1e-2, 1e-1, 1.0, 3.0),
    gm_mf_maxiter=50,
    mats_curvatures=("diag", "kfac", "gram", "fisher_mf"),
    mats_inits=("ta", "fisher"),
    mats_iters=(0, 10, 30, 100),
    mats_dampings=(0.0, 1e-1),
    mats_tr_iters=(10, 30, 100),
    mats_tr_dampings=(1.0, 3.0, 10.0),
    ties=tuple((d, a) for d in (0.1, 0.2, 0.5) for a in (0.5, 0.75, 1.0, 1.5)),
    dare=tuple((d, a) for d in (0.2, 0.5) for a in (0.2, 0.3, 0.5, 0.7)),
    regmean_alphas=(0.5, 0.9, 1.0),
)
#: Quick sizes (CI and ``python -m jmerge.demo``): one setting or a short grid per method.
QUICK = Config(
    tasks=QUICK_TASKS,
    pretrain_steps=800,
    finetune_steps=250,
    finetune_lr=1e-3,
    multitask_steps=600,
    curv_examples=128,
    ta_alphas=(0.2, 0.3, 0.5, 0.7, 1.0),
    fisher_alphas=(0.5, 1.0, 1.5),
    gm_alphas=(0.25, 0.5, 1.0, 2.0),
    gm_diag_priors=(0.1, 1.0),
    gm_mf_alphas=(0.5, 1.0),
    gm_mf_priors=(1e-1, 1.0),
    gm_mf_maxiter=20,
    mats_curvatures=("diag", "kfac", "gram", "fisher_mf"),
    mats_inits=("fisher",),
    mats_iters=(0, 10, 30),
    mats_dampings=(0.0,),
    mats_tr_iters=(30,),
    mats_tr_dampings=(3.0,),
    ties=((0.2, 0.75), (0.5, 1.0)),
    dare=((0.5, 0.3),),
    regmean_alphas=(0.9, 1.0),
    om_steps=(5, 10, 20),
    om_adam_steps=(250, 500, 1000),
)


# ---------------------------------------------------------------------------------------------
# Training, with an orbax cache


#: The fields that define the trained models (and the cache key); the rest are merge grids.
_TRAINING_FIELDS = (
    "tasks",
    "pretrain_steps",
    "finetune_steps",
    "finetune_lr",
    "multitask_steps",
    "finetune",
    "pretrain_task_views",
)


def _cache_key(backbone: str, seed: int, cfg: Config) -> str:
    spec = json.dumps(
        [
            backbone,
            seed,
            cfg.tasks,
            cfg.pretrain_steps,
            cfg.finetune_steps,
            cfg.finetune_lr,
            cfg.multitask_steps,
            MIX_SHARE,
            sorted(MIX_VIEWS),
            "v1",
        ]
        # caches from before the protocol option keep their keys
        + ([cfg.finetune] if cfg.finetune != "full" else [])
        + ([] if cfg.pretrain_task_views else ["no-task-views"])
    )
    return f"{backbone}-s{seed}-{hashlib.sha1(spec.encode()).hexdigest()[:10]}"


def _save(tree: PyTree, path: Path) -> None:
    try:
        from jmerge.io.orbax import save_orbax
    except ImportError:  # the io module is optional here
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path.absolute(), tree)
            ckptr.wait_until_finished()
        return
    save_orbax(tree, path, overwrite=True)


def _restore(path: Path, target: PyTree) -> PyTree:
    try:
        from jmerge.io.orbax import restore_orbax
    except ImportError:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path.absolute(), target)
    return restore_orbax(path, target)


class Trained(NamedTuple):
    theta0: PyTree
    finetuned: list[PyTree]
    multitask: tuple[PyTree, list[PyTree]]


def train_all(
    backbone: str, seed: int, cfg: Config, cache: Path | None, progress: bool
) -> tuple[Trained, bool]:
    """θ0, θ_t and the multitask model (from the orbax cache when present); (models, hit)."""
    model = dx.make_model(backbone)
    sp = load_splits(seed)
    path = None if cache is None else cache / _cache_key(backbone, seed, cfg)
    init = dx.init_params(model, seed)
    t = len(cfg.tasks)
    like = {
        "theta0": init,
        "finetuned": {str(i): init for i in range(t)},
        "mt_params": init,
        "mt_heads": {str(i): init["params"]["head"] for i in range(t)},
    }
    if path is not None and path.exists():
        r = _restore(path, like)
        return (
            Trained(
                r["theta0"],
                [r["finetuned"][str(i)] for i in range(t)],
                (r["mt_params"], [r["mt_heads"][str(i)] for i in range(t)]),
            ),
            True,
        )
    xm, ym = pretrain_mixture(sp, cfg.tasks, seed, cfg.pretrain_task_views)
    theta0 = dx.train(
        model,
        init,
        xm,
        ym,
        steps=cfg.pretrain_steps,
        lr=1e-3,
        batch_size=128,
        seed=seed,
        progress=progress,
        desc="pretrain (mixture)",
    )
    if cfg.finetune not in ("full", "lp-ft"):
        raise ValueError(f"finetune: expected 'full' or 'lp-ft'; got {cfg.finetune!r}.")
    starts = []  # θ_t's starting point: θ0, or θ0 with a linear probe as its head
    for i, task in enumerate(cfg.tasks):
        if cfg.finetune == "full":
            starts.append(theta0)
            continue
        x, y = task_xy(task, *sp["train"])
        starts.append(
            dx.train(
                model,
                theta0,
                x,
                y,
                steps=cfg.finetune_steps,
                lr=10 * cfg.finetune_lr,
                batch_size=64,
                seed=seed * 1000 + 511 + i,
                progress=progress,
                desc=f"probe {task}",
                head_only=True,
            )
        )
    finetuned = []
    for i, task in enumerate(cfg.tasks):
        x, y = task_xy(task, *sp["train"])
        finetuned.append(
            dx.train(
                model,
                starts[i],
                x,
                y,
                steps=cfg.finetune_steps,
                lr=cfg.finetune_lr,
                batch_size=64,
                seed=seed * 1000 + 11 + i,
                progress=progress,
                desc=f"finetune {task}",
            )
        )
    xy = [task_xy(task, *sp["train"]) for task in cfg.tasks]
    mt = dx.fit_multitask(
        model,
        theta0,
        np.stack([a for a, _ in xy]),
        np.stack([b for _, b in xy]),
        steps=cfg.multitask_steps,
        lr=cfg.finetune_lr,
        batch_size=64,
        seed=seed,
        progress=progress,
        heads=[p["params"]["head"] for p in starts],
    )
    trained = Trained(theta0, finetuned, mt)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _save(
            {
                "theta0": theta0,
                "finetuned": {str(i): p for i, p in enumerate(finetuned)},
                "mt_params": mt[0],
                "mt_heads": {str(i): h for i, h in enumerate(mt[1])},
            },
            path,
        )
    return trained, False


# ---------------------------------------------------------------------------------------------
# Evaluation


@functools.partial(jax.jit, static_argnames=("model",))
def _accs(model, backbone, heads, xs, ys):
    """(T,) accuracies of ``backbone`` with heads[t] on (xs[t], ys[t])."""

    def one(head, x, y):
        p = {"params": {"backbone": backbone, "head": head}}
        return jnp.mean(jnp.argmax(model.apply(p, x), -1) == y)

    return jax.vmap(one)(heads, xs, ys)


@dataclasses.dataclass
class Bench:
    """One trained suite instance (backbone, seed): data per task and split, models."""

    backbone: str
    seed: int
    cfg: Config
    model: Any
    trained: Trained
    xy: dict[str, tuple[jax.Array, jax.Array]]  # split -> (T, N, 64), (T, N)
    heads: PyTree  # stacked fine-tuned heads (T, ...)
    ft_acc: dict[str, np.ndarray]  # split -> (T,)

    def accs(self, params: PyTree, split: str, heads: PyTree | None = None) -> np.ndarray:
        h = self.heads if heads is None else heads
        return np.asarray(_accs(self.model, params["params"]["backbone"], h, *self.xy[split]))

    def score(self, params: PyTree, heads: PyTree | None = None) -> tuple[float, float, list]:
        """(val normalized acc, test normalized acc, per-task test normalized acc)."""
        va = self.accs(params, "val", heads) / self.ft_acc["val"]
        te = self.accs(params, "test", heads) / self.ft_acc["test"]
        return float(va.mean()), float(te.mean()), [float(v) for v in te]


def make_bench(backbone: str, seed: int, cfg: Config, cache: Path | None, progress: bool):
    trained, hit = train_all(backbone, seed, cfg, cache, progress)
    sp = load_splits(seed)
    xy = {}
    for split in ("train", "val", "test"):
        pairs = [task_xy(t, *sp[split]) for t in cfg.tasks]
        xy[split] = (jnp.stack([a for a, _ in pairs]), jnp.stack([b for _, b in pairs]))
    heads = jax.tree.map(lambda *h: jnp.stack(h), *[p["params"]["head"] for p in trained.finetuned])
    model = dx.make_model(backbone)
    b = Bench(backbone, seed, cfg, model, trained, xy, heads, {})
    for split in ("val", "test"):
        b.ft_acc[split] = np.array([b.accs(p, split)[i] for i, p in enumerate(trained.finetuned)])
    return b, hit


# ---------------------------------------------------------------------------------------------
# Curvatures


class Curv(NamedTuple):
    fisher: list[PyTree]  # exact diagonal Fisher at θ_t
    sampled: list[PyTree]  # sampled-label diagonal Fisher at θ_t
    fisher0: PyTree  # θ0's sampled diagonal Fisher on the pretraining mixture
    n0: float  # pretraining set size
    ops: dict[str, list[Any]]  # kind -> per-task operator
    inputs: list[jax.Array]  # curvature inputs per task


@dataclasses.dataclass(frozen=True)
class _CE:
    """Softmax cross-entropy of logits against the batch's labels (ggn_operator's loss)."""

    def __call__(self, z: jax.Array, batch: tuple) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(z, batch[1]).mean()


@dataclasses.dataclass(frozen=True)
class _Logits:
    model: Any

    def __call__(self, params: PyTree, batch: tuple) -> jax.Array:
        return self.model.apply(params, batch[0])


def _zero_where(tree: PyTree, keys: set[str]) -> PyTree:
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if jax.tree_util.keystr(p) in keys else x, tree
    )


def compute_curvatures(
    b: Bench, kinds: Sequence[str], progress: bool, num_examples: int | None = None
) -> Curv:
    """Every task's curvatures at θ_t on ``num_examples`` (default ``cfg.curv_examples``) of
    its training inputs, and θ0's prior Fisher; see the module docstring."""
    from jmerge import curvature as jc

    logits = dx.LogitsFn(b.model)
    n = b.cfg.curv_examples if num_examples is None else num_examples
    out: dict[str, list] = {k: [] for k in kinds}
    fisher, sampled, inputs = [], [], []
    x_tr, y_tr = b.xy["train"]
    for i, p in enumerate(
        tqdm(b.trained.finetuned, desc="curvature", disable=not progress, leave=False)
    ):
        idx = np.sort(np.random.default_rng([b.seed, i, 3]).permutation(x_tr.shape[1])[:n])
        x, y = x_tr[i, idx], y_tr[i, idx]
        inputs.append(x)
        f = jc.fisher_diag(logits, p, x, kind="exact")
        fisher.append(f)
        sampled.append(
            jc.fisher_diag(logits, p, x, kind="sampled", key=jax.random.key(b.seed * 100 + i))
        )
        if "gram" in kinds:
            out["gram"].append(jc.gram(logits, p, x, normalize="mean"))
        if "kfac" in kinds:
            k = jc.kfac_factors(logits, p, x, kind="exact", rest=0.0)
            out["kfac"].append(jc.Sum((k, jc.Diagonal(_zero_where(f, set(k.factors))))))
        if "fisher_mf" in kinds:
            op = jc.fisher_operator(logits, p, x)
            out["fisher_mf"].append(jc.MatrixFree(op.mv_fn, diag_tree=f, operands=op.operands))
        if "ggn_mf" in kinds:
            op = jc.ggn_operator(_Logits(b.model), _CE(), p, (x, y))
            out["ggn_mf"].append(jc.MatrixFree(op.mv_fn, diag_tree=f, operands=op.operands))
        if "diag" in kinds:
            out["diag"].append(jc.Diagonal(f))
    xm, _ = pretrain_mixture(load_splits(b.seed), b.cfg.tasks, b.seed, b.cfg.pretrain_task_views)
    idx = np.random.default_rng([b.seed, 5]).permutation(xm.shape[0])[: 2 * n]
    f0 = jc.fisher_diag(
        logits,
        b.trained.theta0,
        jnp.asarray(xm[idx]),
        kind="sampled",
        key=jax.random.key(b.seed),
    )
    return Curv(fisher, sampled, f0, float(xm.shape[0]), out, inputs)


# ---------------------------------------------------------------------------------------------
# Diagnostics


@functools.partial(jax.jit, static_argnames=("model",))
def _kl(model, p_t, p_m, x):
    lt = jax.nn.log_softmax(model.apply(p_t, x))
    lm = jax.nn.log_softmax(model.apply(p_m, x))
    return jnp.mean(jnp.sum(jnp.exp(lt) * (lt - lm), -1))


def kl_ratio(b: Bench, curv: Curv, merged: PyTree) -> float:
    """Σ_t KL(p_θt ‖ p_merge) / Σ_t ½ δ_tᵀ F_t δ_t over the tasks' curvature inputs."""
    from jmerge import curvature as jc

    logits = dx.LogitsFn(b.model)
    kl, quad = 0.0, 0.0
    for p, x in zip(b.trained.finetuned, curv.inputs, strict=True):
        m = dx.with_head(merged, p["params"]["head"])
        d = jax.tree.map(jnp.subtract, m, p)
        kl += float(_kl(b.model, p, m, x))
        fd = jc.fisher_operator(logits, p, x).mv(d)
        quad += 0.5 * float(optax.tree_utils.tree_vdot(d, fd))
    return kl / quad if quad > 0 else float("nan")


def task_vector_ratio(b: Bench) -> float:
    """Mean over tasks of ‖τ_t‖ / ‖θ0‖ over the backbone."""
    bb0 = b.trained.theta0["params"]["backbone"]
    n0 = float(optax.tree_utils.tree_norm(bb0))
    rs = [
        float(optax.tree_utils.tree_norm(jax.tree.map(jnp.subtract, p["params"]["backbone"], bb0)))
        / n0
        for p in b.trained.finetuned
    ]
    return float(np.mean(rs))


# ---------------------------------------------------------------------------------------------
# Methods


def run_methods(b: Bench, curv: Curv, progress: bool) -> list[Candidate]:
    """Every method at every grid point; each a :class:`Candidate` scored on val and test."""
    import jmerge

    cfg = b.cfg
    p0, ft = b.trained.theta0, b.trained.finetuned
    t = len(ft)
    sizes = [float(b.xy["train"][0].shape[1])] * t
    out: list[Candidate] = []

    def add(method: str, setting: dict, result: Any) -> PyTree:
        params = getattr(result, "params", result)
        va, te, per = b.score(params)
        extra = {"per_task": per, "params": params}
        info = getattr(result, "info", None)
        if info is not None and hasattr(info, "num_steps"):
            extra["cg_steps"] = int(info.num_steps)
        if info is not None and hasattr(info, "cg_steps"):  # output matching
            extra["cg_steps"] = int(info.cg_steps)
            extra["objective"] = float(info.objective)
        out.append(Candidate(method, setting, va, te, extra))
        return params

    ta_j = jax.jit(lambda p, f, a: jmerge.task_arithmetic(p, f, a, exclude=HEAD))
    fisher_j = jax.jit(lambda p, f, c: jmerge.fisher_merge(f, c, pretrained=p, exclude=HEAD))
    steps: list[tuple[str, Callable[[], None]]] = []

    steps.append(
        ("average", lambda: add("average", {}, jmerge.average(ft, pretrained=p0, exclude=HEAD)))
    )
    for a in cfg.ta_alphas:
        steps.append(("task_arith", lambda a=a: add("task_arith", {"a": a}, ta_j(p0, ft, a))))
    for d, a in cfg.ties:
        steps.append(
            (
                "ties",
                lambda d=d, a=a: add(
                    "ties", {"d": d, "a": a}, jmerge.ties(p0, ft, density=d, alpha=a, exclude=HEAD)
                ),
            )
        )
    for d, a in cfg.dare:
        steps.append(
            (
                "dare",
                lambda d=d, a=a: add(
                    "dare",
                    {"d": d, "a": a},
                    jmerge.dare(
                        p0, ft, density=d, alpha=a, key=jax.random.key(b.seed), exclude=HEAD
                    ),
                ),
            )
        )
    fisher_state: dict[str, PyTree] = {}

    def fisher_alpha(a):
        if "f" not in fisher_state:
            fisher_state["f"] = fisher_j(p0, ft, curv.fisher)
        f = fisher_state["f"]
        add("fisher", {"a": a}, jax.tree.map(lambda x, y: x + a * (y - x), p0, f))

    for a in cfg.fisher_alphas:
        steps.append(("fisher", lambda a=a: fisher_alpha(a)))
    if "gram" in curv.ops:
        for a in cfg.regmean_alphas:
            steps.append(
                (
                    "regmean",
                    lambda a=a: add(
                        "regmean",
                        {"offdiag": a},
                        jmerge.regmean(ft, curv.ops["gram"], alpha=a, pretrained=p0, exclude=HEAD),
                    ),
                )
            )

    # gradient matching, diagonal, the paper's recipe: H_t = N_t F_t (sampled), H0 = c N0 F0.
    gm_diag_j = jax.jit(
        lambda p, f, c, a, prior: jmerge.gradient_matching(
            p, f, c, alpha=a, prior=prior, dataset_sizes=sizes, exclude=HEAD
        )
    )
    for c in cfg.gm_diag_priors:
        prior = jax.tree.map(lambda x, c=c: c * curv.n0 * x, curv.fisher0)
        for a in cfg.gm_alphas:
            steps.append(
                (
                    "gm_diag",
                    lambda a=a, c=c, prior=prior: add(
                        "gradmatch_diag",
                        {"a": a, "c": c},
                        gm_diag_j(p0, ft, curv.sampled, a, prior),
                    ),
                )
            )
    if "fisher_mf" in curv.ops:
        gm_mf_j = jax.jit(
            lambda p, f, c, a, d: jmerge.gradient_matching(
                p,
                f,
                c,
                alpha=a,
                prior=d,
                dataset_sizes=sizes,
                maxiter=cfg.gm_mf_maxiter,
                exclude=HEAD,
            )
        )
        for d in cfg.gm_mf_priors:
            for a in cfg.gm_mf_alphas:
                steps.append(
                    (
                        "gm_mf",
                        lambda a=a, d=d: add(
                            "gradmatch_mf",
                            {"a": a, "prior": d},
                            gm_mf_j(p0, ft, curv.ops["fisher_mf"], jnp.float32(a), jnp.float32(d)),
                        ),
                    )
                )

    # MaTS: init pytrees computed once (task arithmetic at its validation-chosen α). Two
    # rows per curvature: ``mats_<kind>`` damps towards θ0 (``damping_anchor="pretrained"``,
    # iterations from 0, i.e. the init itself); ``mats_<kind>_tr`` is a trust region around
    # the init (``damping_anchor="init"``, δ relative to the mean curvature diagonal): CG may
    # only move as far from the init as the damping allows.
    def mats_fn(k: int, anchor: str):
        return jax.jit(
            lambda p, f, c, init, damp: jmerge.mats(
                p,
                f,
                c,
                init=init,
                damping=damp,
                maxiter=k,
                rtol=1e-6,
                exclude=HEAD,
                damping_anchor=anchor,
            )
        )

    mats_j = {k: mats_fn(k, "pretrained") for k in cfg.mats_iters}
    mats_tr_j = {k: mats_fn(k, "init") for k in cfg.mats_tr_iters}
    inits: dict[str, PyTree] = {}

    def init_of(name: str) -> PyTree:
        if name not in inits:
            if name == "ta":
                ta = [c for c in out if c.method == "task_arith"]
                a = best_per_method(ta)["task_arith"].setting["a"]
                inits[name] = ta_j(p0, ft, a)
            elif name == "average":
                inits[name] = jmerge.average(ft, pretrained=p0, exclude=HEAD)
            else:
                inits[name] = fisher_j(p0, ft, curv.fisher)
        return inits[name]

    def mats_step(name, fn, ops, init, damp, k):
        setting = {"init": init, "damp": damp, "iters": k}
        add(name, setting, fn(p0, ft, ops, init_of(init), jnp.float32(damp)))

    for kind in cfg.mats_curvatures:
        ops = curv.ops[kind]
        if kind == "diag":
            for damp in cfg.mats_dampings:
                steps.append(
                    (
                        "mats",
                        lambda ops=ops, damp=damp: add(
                            "mats_diag",
                            {"damp": damp},
                            mats_j[max(cfg.mats_iters)](
                                p0, ft, ops, init_of("fisher"), jnp.float32(damp)
                            ),
                        ),
                    )
                )
            continue
        for suffix, dampings, iters, fns in (
            ("", cfg.mats_dampings, cfg.mats_iters, mats_j),
            ("_tr", cfg.mats_tr_dampings, cfg.mats_tr_iters, mats_tr_j),
        ):
            for init in cfg.mats_inits:
                for damp in dampings:
                    for k in iters:
                        step = functools.partial(
                            mats_step, f"mats_{kind}{suffix}", fns[k], ops, init, damp, k
                        )
                        steps.append(("mats", step))

    # Output matching: Σ_t KL(p_θt ‖ p_θ) on the curvature inputs (no labels) minimised
    # itself rather than its quadratic model, from the closed-form Fisher merge; Gauss-Newton
    # (jmerge's default solver) and Adam on the same objective, each run for each step count.
    logits = dx.LogitsFn(b.model)

    def om_fn(k: int, solver: Any):
        return jax.jit(
            lambda p, f, xs, init: jmerge.output_matching(
                logits, p, f, xs, init=init, exclude=HEAD, steps=k, solver=solver
            )
        )

    for name, solver, grid in (
        ("output_match", "gauss_newton", cfg.om_steps),
        ("output_match_adam", optax.adam(1e-3), cfg.om_adam_steps),
    ):
        for k in grid:
            fn = om_fn(k, solver)
            steps.append(
                (
                    "output_matching",
                    lambda name=name, k=k, fn=fn: add(
                        name, {"steps": k}, fn(p0, ft, list(curv.inputs), init_of("fisher"))
                    ),
                )
            )

    bar = tqdm(steps, desc="merge", disable=not progress, leave=False)
    for name, fn in bar:
        bar.set_postfix_str(name)
        fn()
    return out


# ---------------------------------------------------------------------------------------------
# One suite run


class SeedResult(NamedTuple):
    backbone: str
    seed: int
    tasks: tuple[str, ...]
    candidates: list[Candidate]
    refs: dict[str, tuple[float, float, list[float]]]  # θ0 / multitask: (val, test, per-task)
    ft_test_acc: list[float]
    tau_ratio: float
    kl: dict[str, float]
    seconds: dict[str, float]


def run_seed(backbone: str, seed: int, cfg: Config, cache: Path | None, progress: bool):
    t0 = time.perf_counter()
    b, hit = make_bench(backbone, seed, cfg, cache, progress)
    t1 = time.perf_counter()
    kinds = sorted({k for k in cfg.mats_curvatures} | {"gram", "fisher_mf"})
    curv = compute_curvatures(b, kinds, progress)
    t2 = time.perf_counter()
    cands = run_methods(b, curv, progress)
    t3 = time.perf_counter()
    mt_params, mt_heads = b.trained.multitask
    refs = {
        "theta0": b.score(b.trained.theta0),
        "multitask": b.score(mt_params, jax.tree.map(lambda *h: jnp.stack(h), *mt_heads)),
    }
    best = best_per_method(cands)
    kl = {m: kl_ratio(b, curv, c.extra["params"]) for m, c in best.items()}
    slim = [c._replace(extra={k: v for k, v in c.extra.items() if k != "params"}) for c in cands]
    return SeedResult(
        backbone,
        seed,
        cfg.tasks,
        slim,
        refs,
        [float(a) for a in b.ft_acc["test"]],
        task_vector_ratio(b),
        kl,
        {"train": t1 - t0, "cache_hit": float(hit), "curvature": t2 - t1, "merge": t3 - t2},
    )


def trust_region_sweep(
    backbone: str,
    seed: int,
    cfg: Config,
    cache: Path | None,
    *,
    examples: Sequence[int] = (128, 720),
    kinds: Sequence[str] = ("kfac", "gram", "fisher_mf"),
    settings: Sequence[tuple[str, float]] = (
        ("pretrained", 0.0),
        ("init", 1.0),
        ("init", 3.0),
        ("init", 10.0),
    ),
    iters: int = 30,
    progress: bool = False,
) -> list[tuple]:
    """What the trust region and more curvature examples do to MaTS, one seed.

    For each number of curvature examples n, curvature kind and (anchor, relative δ): MaTS
    from the closed-form diagonal Fisher init with ``iters`` CG iterations; returns rows
    ``(kind, n, anchor, δ, val, test, KL/quad)``. The KL/quadratic ratio is always measured
    on the largest n's inputs and Fisher (the same yardstick for every row), so that only
    the merge changes between rows.
    """
    import jmerge

    b, _ = make_bench(backbone, seed, cfg, cache, progress)
    curvs = {n: compute_curvatures(b, kinds, progress, num_examples=n) for n in examples}
    yardstick = curvs[max(examples)]
    p0, ft = b.trained.theta0, b.trained.finetuned
    fns = {
        a: jax.jit(
            lambda p, f, c, init, d, a=a: jmerge.mats(
                p, f, c, init=init, damping=d, damping_anchor=a, maxiter=iters, exclude=HEAD
            )
        )
        for a in {a for a, _ in settings}
    }
    rows = []
    for n, curv in curvs.items():
        init = jmerge.fisher_merge(ft, curv.fisher, pretrained=p0, exclude=HEAD)
        va, te, _ = b.score(init)
        rows.append(("fisher (init)", n, "-", 0.0, va, te, kl_ratio(b, yardstick, init)))
        for kind in kinds:
            for anchor, damp in settings:
                m = fns[anchor](p0, ft, curv.ops[kind], init, jnp.float32(damp)).params
                va, te, _ = b.score(m)
                rows.append((kind, n, anchor, damp, va, te, kl_ratio(b, yardstick, m)))
    return rows


# ---------------------------------------------------------------------------------------------
# Reports


def summarize(results: Sequence[SeedResult], *, markdown: bool = False) -> str:
    """The comparison table over seeds: per-task test normalized accuracy (mean), average
    ± std, the validation-chosen setting per seed, and the KL / quadratic-model ratio."""
    tasks = results[0].tasks
    rows = []

    def per_task(lists):
        return [f"{np.mean([x[i] for x in lists]):.3f}" for i in range(len(tasks))]

    for name in ("theta0", "multitask"):
        vals = [r.refs[name] for r in results]
        m, s = mean_std([v[1] for v in vals])
        rows.append([name, *per_task([v[2] for v in vals]), f"{m:.3f} ± {s:.3f}", "-", "-"])
    rows.append(["finetuned", *["1.000"] * len(tasks), "1.000 ± 0.000", "-", "-"])
    bests = [best_per_method(r.candidates) for r in results]
    for method in bests[0]:
        chosen = [bp[method] for bp in bests]
        m, s = mean_std([c.test for c in chosen])
        settings = "; ".join(format_setting(c.setting) or "-" for c in chosen)
        kl = np.mean([r.kl[method] for r in results])
        rows.append(
            [
                method,
                *per_task([c.extra["per_task"] for c in chosen]),
                f"{m:.3f} ± {s:.3f}",
                f"{kl:.2f}",
                settings,
            ]
        )
    header = ["method", *[t[:8] for t in tasks], "norm. acc (test)", "KL/quad", "val-chosen"]
    return table(header, rows, markdown=markdown)


def curve(results: Sequence[SeedResult], method: str, x: str, fixed: Callable[[dict], bool]):
    """Mean/std over seeds of the test score of ``method`` against setting ``x``, among the
    candidates with ``fixed(setting)`` (e.g. the validation-chosen prior)."""
    xs = sorted(
        {c.setting[x] for c in results[0].candidates if c.method == method and fixed(c.setting)}
    )
    ys = [
        [
            next(
                c.test
                for c in r.candidates
                if c.method == method and c.setting[x] == v and fixed(c.setting)
            )
            for r in results
        ]
        for v in xs
    ]
    return xs, [np.mean(y) for y in ys], [np.std(y) for y in ys]


def make_plots(results: Sequence[SeedResult], out: Path, tag: str) -> list[Path]:
    """``{tag}_alpha.png`` (accuracy against α) and ``{tag}_cg.png`` (MaTS against CG
    iterations) under ``out``."""
    bb = results[0].backbone
    best = best_per_method(results[0].candidates)
    refs = {
        "multitask": float(np.mean([r.refs["multitask"][1] for r in results])),
        "θ0": float(np.mean([r.refs["theta0"][1] for r in results])),
    }
    curves = {
        "task arithmetic": curve(results, "task_arith", "a", lambda s: True),
        "Fisher merging, θ0 + α(θ_F − θ0)": curve(results, "fisher", "a", lambda s: True),
    }
    if "gradmatch_diag" in best:
        c = best["gradmatch_diag"].setting["c"]
        curves[f"grad. matching diag (c={c:g})"] = curve(
            results, "gradmatch_diag", "a", lambda s: s["c"] == c
        )
    if "gradmatch_mf" in best:
        d = best["gradmatch_mf"].setting["prior"]
        curves[f"grad. matching matrix-free (δ={d:g})"] = curve(
            results, "gradmatch_mf", "a", lambda s: s["prior"] == d
        )
    paths = [
        plot_curves(
            out / f"{tag}_alpha.png",
            curves,
            xlabel="α",
            ylabel="normalized accuracy (test)",
            title=f"digits ({bb}): robustness to α",
            reference=refs,
        )
    ]
    curves = {}
    for m in best:
        if not m.startswith("mats_") or m == "mats_diag":
            continue
        damp = best[m].setting["damp"]
        for init in sorted({c.setting["init"] for c in results[0].candidates if c.method == m}):
            curves[f"{m[5:]}, init {init}, δ={damp:g}"] = curve(
                results,
                m,
                "iters",
                lambda s, init=init, damp=damp: s["init"] == init and s["damp"] == damp,
            )
    if curves:
        paths.append(
            plot_curves(
                out / f"{tag}_cg.png",
                curves,
                xlabel="CG iterations",
                ylabel="normalized accuracy (test)",
                title=f"digits ({bb}): MaTS against CG iterations",
                reference=refs,
                logx=True,
            )
        )
    return paths


def claims(results: Sequence[SeedResult]) -> list[str]:
    """The papers' claims, checked on the test scores of the validation-chosen settings.

    "A beats B" is judged on the paired per-seed differences: HOLDS when A wins on every
    seed, TIE when the mean difference is within one std of the differences, MIXED when it
    is above that yet A lost a seed, else FAILS.
    """
    bests = [best_per_method(r.candidates) for r in results]

    def chosen(m):
        return float(np.mean([bp[m].test for bp in bests])) if m in bests[0] else float("nan")

    def beats(a: str, b: str) -> str:
        d = np.array([bp[a].test - bp[b].test for bp in bests])
        if (d > 0).all():
            verdict = "HOLDS"
        elif abs(d.mean()) <= d.std():
            verdict = "TIE"
        else:
            verdict = "MIXED" if d.mean() > 0 else "FAILS"
        return (
            f"{verdict} (diff {d.mean():+.3f} ± {d.std():.3f}, wins {int((d > 0).sum())}/{d.size})"
        )

    def spread(m, fixed):
        losses = []
        for r, bp in zip(results, bests, strict=True):
            cs = [c for c in r.candidates if c.method == m and fixed(c, bp[m])]
            losses.append(bp[m].test - min(c.test for c in cs))
        return float(np.mean(losses))

    lines = []
    ta, gm = chosen("task_arith"), chosen("gradmatch_diag")
    ta_loss = spread("task_arith", lambda c, b: True)
    gm_loss = spread("gradmatch_diag", lambda c, b: c.setting["c"] == b.setting["c"])
    lines.append(
        f"(a) gradient matching (diag) {gm:.3f} vs task arithmetic {ta:.3f} at the "
        f"validation-chosen α: {beats('gradmatch_diag', 'task_arith')}; worst-α loss "
        f"{gm_loss:.3f} vs {ta_loss:.3f} (need ≤ half): "
        f"{'HOLDS' if gm_loss <= 0.5 * ta_loss else 'FAILS'}"
    )
    if "gradmatch_mf" in bests[0]:
        gmf = chosen("gradmatch_mf")
        gmf_loss = spread("gradmatch_mf", lambda c, b: c.setting["prior"] == b.setting["prior"])
        lines.append(
            f"    gradient matching (matrix-free) {gmf:.3f} vs task arithmetic: "
            f"{beats('gradmatch_mf', 'task_arith')}; worst-α loss {gmf_loss:.3f}"
        )
    cg = {m: chosen(m) for m in bests[0] if m.startswith("mats_") and m != "mats_diag"}
    for m in sorted(cg, key=cg.get, reverse=True):
        lines.append(
            f"(b) MaTS with CG ({m}) {cg[m]:.3f} vs Fisher merging {chosen('fisher'):.3f}: "
            f"{beats(m, 'fisher')}; vs RegMean {chosen('regmean'):.3f}: {beats(m, 'regmean')}"
        )
    if "output_match" in bests[0]:
        quad = {m: chosen(m) for m in bests[0] if m.startswith(("mats_", "regmean", "fisher"))}
        best_quad = max(quad, key=quad.get)
        lines.append(
            f"(c) output matching (Gauss-Newton on the KL) {chosen('output_match'):.3f} vs the "
            f"best quadratic-model merge ({best_quad}) {quad[best_quad]:.3f}: "
            f"{beats('output_match', best_quad)}; vs Adam on the same objective "
            f"{chosen('output_match_adam'):.3f}: {beats('output_match', 'output_match_adam')}"
        )
    merges = {m: chosen(m) for m in bests[0]}
    top = max(merges, key=merges.get)
    mt = float(np.mean([r.refs["multitask"][1] for r in results]))
    lines.append(
        f"best merge {top} {merges[top]:.3f}, multitask {mt:.3f}: gap "
        f"{mt - merges[top]:.3f} (aim ≤ 0.10)"
    )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one seed (CI, demo)")
    parser.add_argument(
        "--grid",
        choices=("quick", "full"),
        default=None,
        help="merge grids and curvature examples (default: as --quick); '--grid quick' at full "
        "sizes trains as the full suite (same cache) and merges with the quick grids",
    )
    parser.add_argument("--backbone", choices=("mlp", "cnn", "vit", "all"), default="mlp")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first..first+seeds-1")
    parser.add_argument(
        "--tr-sweep",
        action="store_true",
        help="only the trust-region / curvature-examples sweep of MaTS (first seed)",
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        help="report over the seeds saved in these JSON outputs (of runs split by seed)",
    )
    parser.add_argument(
        "--cache",
        default=os.environ.get("JMERGE_CACHE", str(Path.home() / ".cache" / "jmerge" / "quality")),
        help="orbax checkpoint cache ('' disables)",
    )
    parser.add_argument(
        "--finetune",
        choices=("full", "lp-ft"),
        default="full",
        help="how θ_t is fine-tuned: every parameter from θ0 and its head (full), or a linear "
        "probe first (lp-ft, Kumar et al. 2022); outputs get the suffix _lpft",
    )
    parser.add_argument(
        "--no-task-views",
        action="store_true",
        help="pretrain θ0 without the input tasks' views (only the other views of the "
        "mixture); outputs get the suffix _notv",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--out", default=str(RESULTS), help="folder for PNG and JSON outputs")
    parser.add_argument("--markdown", action="store_true", help="markdown tables")
    args = parser.parse_args(argv)
    cfg = (QUICK if args.quick else FULL)._replace(
        finetune=args.finetune, pretrain_task_views=not args.no_task_views
    )
    if args.grid is not None:
        grids = QUICK if args.grid == "quick" else FULL
        cfg = grids._replace(**{f: getattr(cfg, f) for f in _TRAINING_FIELDS})
    seeds = range(args.first_seed, args.first_seed + (args.seeds or (1 if args.quick else 3)))
    cache = Path(args.cache) if args.cache else None
    progress = not args.no_progress
    out = Path(args.out)
    backbones = ("mlp", "cnn", "vit") if args.backbone == "all" else (args.backbone,)
    start = time.perf_counter()
    if args.tr_sweep:
        bb = backbones[0]
        rows = trust_region_sweep(bb, seeds[0], cfg, cache, progress=progress)
        print(
            f"\n## MaTS trust region and curvature examples, digits {bb}, seed {seeds[0]}, "
            "init closed-form Fisher, 30 CG iterations; KL/quad on every training input"
        )
        header = ["curvature", "examples", "anchor", "δ (rel.)", "val", "test", "KL/quad"]
        fmt = [
            [k, n, a, f"{d:g}", f"{v:.3f}", f"{t:.3f}", f"{r:.1f}"] for k, n, a, d, v, t, r in rows
        ]
        print(table(header, fmt, markdown=args.markdown))
        return 0
    if args.combine:
        loaded = [r for f in args.combine for r in _load_json(Path(f))]
        _report(sorted(loaded, key=lambda r: r.seed), cfg, args, out)
        return 0
    for bb in backbones:
        results: list[SeedResult] = []
        for seed in seeds:
            results.append(run_seed(bb, seed, cfg, cache, progress))
            # The report over the seeds done so far, after every seed: a long run that is
            # stopped keeps its finished seeds (table, JSON, plots).
            _report(results, cfg, args, out)
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


def _report(results: Sequence[SeedResult], cfg: Config, args: argparse.Namespace, out: Path):
    bb = results[0].backbone
    sizes = "quick" if args.quick else "full"
    grid = args.grid or sizes
    tag = f"digits_{bb}{'_quick' if args.quick else ''}"
    tag += f"_{grid}grid" if grid != sizes else ""
    tag += "_lpft" if cfg.finetune == "lp-ft" else ""
    tag += "" if cfg.pretrain_task_views else "_notv"
    print(
        f"\n## digits, {bb} backbone, {sizes} sizes, {grid} grids, fine-tuning {cfg.finetune}"
        f"{'' if cfg.pretrain_task_views else ', θ0 without the task views'}; tasks "
        f"{', '.join(cfg.tasks)}; seeds {[r.seed for r in results]}"
    )
    print(
        f"‖τ_t‖/‖θ0‖ (backbone, mean over tasks): "
        f"{np.mean([r.tau_ratio for r in results]):.3f}; fine-tuned test accuracy "
        f"(mean over tasks): {np.mean([np.mean(r.ft_test_acc) for r in results]):.3f}"
    )
    for r in results:
        s = r.seconds
        print(
            f"seed {r.seed}: train {s['train']:.1f} s"
            f"{' (cache)' if s['cache_hit'] else ''}, curvature {s['curvature']:.1f} s, "
            f"merges {s['merge']:.1f} s ({len(r.candidates)} merges)"
        )
    print(
        "normalized accuracy = merged / fine-tuned test accuracy, per task (mean over "
        "seeds) and averaged (mean ± std over seeds); settings chosen on validation"
    )
    print(summarize(results, markdown=args.markdown))
    for line in claims(results):
        print(line)
    if not args.no_plots:
        for p in make_plots(results, out, tag):
            print(f"plot: {p}")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{tag}.json", "w") as fh:
        json.dump([_jsonable(r) for r in results], fh, indent=1)


def _load_json(path: Path) -> list[SeedResult]:
    """The :class:`SeedResult` s saved by :func:`_jsonable` (without merged parameters)."""
    fields = ("method", "setting", "val", "test")
    out = []
    for d in json.loads(path.read_text()):
        cands = [
            Candidate(*(c[k] for k in fields), {k: v for k, v in c.items() if k not in fields})
            for c in d["candidates"]
        ]
        refs = {k: tuple(v) for k, v in d["refs"].items()}
        out.append(
            SeedResult(**{**d, "candidates": cands, "refs": refs, "tasks": tuple(d["tasks"])})
        )
    return out


def _jsonable(r: SeedResult) -> dict:
    d = r._asdict()
    d["candidates"] = [
        {
            "method": c.method,
            "setting": dict(c.setting),
            "val": c.val,
            "test": c.test,
            **{k: v for k, v in c.extra.items()},
        }
        for c in r.candidates
    ]
    return d


if __name__ == "__main__":
    raise SystemExit(main())
