"""The digits merging benchmark (DESIGN.md §4): one backbone, many input views, unmerged heads.

Data are scikit-learn's bundled 8×8 digits (1797 images, no download), scaled to [0, 1],
flattened to 64 features and split once into train/test (stratified, seeded). A *task* is a
fixed transform of the input (a "view"): rotation, flips, transpose, inversion, a fixed pixel
permutation, additive noise. The recipe:

1. pretrain a classifier ``θ0`` on the untransformed view (:data:`PRETRAIN_VIEW`);
2. fine-tune ``θ_t`` from ``θ0`` on each task view (backbone and head);
3. merge the backbones (``exclude=r"head"`` keeps every head out of the merge);
4. evaluate the merged backbone on each task with that task's own fine-tuned head.

The metric is the normalized accuracy, (1/T) Σ_t acc(merged, t) / acc(θ_t, t), and the upper
bound a multitask model trained jointly on all views with one head per task.

Parameters are laid out as ``{"params": {"backbone": ..., "head": {"kernel", "bias"}}}``. The
backbone is an MLP (64 → 128 → 128, GELU; Dense layers ``dense0``, ``dense1``) or a small CNN
(``conv0``, ``conv1`` on 8×8×1, then Dense ``dense0``), chosen by :func:`make_model`.

Everything is a pure function of its arguments and seeds: the same call returns the same
numbers. Training is a jitted ``lax.scan`` of Adam steps, shown by a tqdm bar per chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

__all__ = [
    "PRETRAIN_VIEW",
    "TASKS",
    "DigitsData",
    "Benchmark",
    "load_data",
    "view",
    "task_split",
    "MLPBackbone",
    "CNNBackbone",
    "ViTBackbone",
    "Classifier",
    "make_model",
    "init_params",
    "train",
    "pretrain",
    "finetune",
    "train_multitask",
    "fit_multitask",
    "accuracy",
    "with_head",
    "heads_of",
    "evaluate",
    "evaluate_all",
    "normalized_accuracy",
    "LogitsFn",
    "LossFn",
    "curvature_inputs",
    "build_benchmark",
]

PyTree = Any

NUM_CLASSES = 10
PRETRAIN_VIEW = "identity"
_PERMUTATION_SEED = 1234
_NOISE_SEED = 4321
_NOISE_STD = 0.3


def _images(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], 8, 8)


def _flat(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img.reshape(img.shape[0], 64), dtype=np.float32)


def _permute(x: np.ndarray) -> np.ndarray:
    perm = np.random.default_rng(_PERMUTATION_SEED).permutation(64)
    return np.ascontiguousarray(x[:, perm], dtype=np.float32)


def _noise(x: np.ndarray) -> np.ndarray:
    # One fixed Gaussian draw per (row, pixel), seeded by the seed and the array's shape:
    # the same array always gets the same noise.
    rng = np.random.default_rng([_NOISE_SEED, *x.shape])
    return (x + _NOISE_STD * rng.standard_normal(x.shape)).astype(np.float32)


#: The task views, in the order the demo takes them (``--tasks N`` uses the first N). Each maps
#: an array (N, 64) of pixels in [0, 1] to an array of the same shape, deterministically.
TASKS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rot90": lambda x: _flat(np.rot90(_images(x), k=1, axes=(1, 2))),
    "flip_lr": lambda x: _flat(_images(x)[:, :, ::-1]),
    "flip_ud": lambda x: _flat(_images(x)[:, ::-1, :]),
    "invert": lambda x: _flat(1.0 - x),
    "permute": _permute,
    "noise": _noise,
    "transpose": lambda x: _flat(np.swapaxes(_images(x), 1, 2)),
}

_VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    PRETRAIN_VIEW: lambda x: _flat(x),
    **TASKS,
}


class DigitsData(NamedTuple):
    """The untransformed split: pixels in [0, 1], shape (N, 64) float32; labels (N,) int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@functools.lru_cache(maxsize=8)
def _load_cached(seed: int, test_size: float) -> DigitsData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    for a in (x_tr, x_te, y_tr, y_te):
        a.setflags(write=False)
    return DigitsData(x_tr, y_tr, x_te, y_te)


def load_data(seed: int = 0, test_size: float = 0.3) -> DigitsData:
    """Load scikit-learn's digits, scale to [0, 1] and split (stratified by label, seeded).

    Args:
      seed: ``random_state`` of the split.
      test_size: share of the 1797 images held out.

    Returns:
      A :class:`DigitsData` of read-only NumPy arrays (1257 train / 540 test by default).
    """
    return _load_cached(int(seed), float(test_size))


def view(task: str, x: np.ndarray) -> np.ndarray:
    """Apply the fixed transform of ``task`` (a key of :data:`TASKS` or ``"identity"``).

    Args:
      task: the view's name.
      x: pixels, shape (N, 64), values in [0, 1].

    Returns:
      The transformed pixels, shape (N, 64), float32. Deterministic: the same ``x`` always
      gives the same output.
    """
    if task not in _VIEWS:
        raise KeyError(f"unknown digits view {task!r}; known: {sorted(_VIEWS)}")
    return _VIEWS[task](np.asarray(x, np.float32))


def task_split(
    data: DigitsData, task: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` of ``task``'s view of ``data``."""
    return view(task, data.x_train), data.y_train, view(task, data.x_test), data.y_test


# ---------------------------------------------------------------------------------------------
# Models


class MLPBackbone(nn.Module):
    """x (…, 64) ↦ GELU(Dense(GELU(Dense(x)))), widths ``features`` (default 128, 128)."""

    features: Sequence[int] = (128, 128)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, f in enumerate(self.features):
            x = nn.gelu(nn.Dense(f, name=f"dense{i}")(x))
        return x


class CNNBackbone(nn.Module):
    """x (…, 64) as 8×8×1 ↦ Conv3×3(16) → Conv3×3/2(32) → flatten → Dense(128), ReLU."""

    channels: Sequence[int] = (16, 32)
    features: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch = x.shape[:-1]
        h = x.reshape(-1, 8, 8, 1)
        h = nn.relu(nn.Conv(self.channels[0], (3, 3), name="conv0")(h))
        h = nn.relu(nn.Conv(self.channels[1], (3, 3), strides=(2, 2), name="conv1")(h))
        h = h.reshape(h.shape[0], -1)
        h = nn.relu(nn.Dense(self.features, name="dense0")(h))
        return h.reshape(*batch, self.features)


class ViTBackbone(nn.Module):
    """A tiny vision transformer: x (…, 64) as 8×8 cut into 16 patches of 2×2 pixels, each
    embedded by Dense(``dim``) plus a learned position embedding, then ``depth`` pre-norm
    blocks (LayerNorm → ``heads``-head self-attention → residual; LayerNorm → Dense(2·dim)
    → GELU → Dense(dim) → residual), a final LayerNorm and the mean over patches (…, dim).

    The gradient-matching paper's claims are for transformers (Daheim et al. 2024, §4); this
    is the smallest model with the same parts.
    """

    dim: int = 32
    depth: int = 2
    heads: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch = x.shape[:-1]
        h = x.reshape(-1, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(-1, 16, 4)
        h = nn.Dense(self.dim, name="embed")(h)
        pos = self.param("pos", nn.initializers.normal(0.02), (16, self.dim))
        h = h + pos
        for i in range(self.depth):
            a = nn.LayerNorm(name=f"ln_att{i}")(h)
            a = nn.MultiHeadDotProductAttention(num_heads=self.heads, name=f"att{i}")(a, a)
            h = h + a
            m = nn.LayerNorm(name=f"ln_mlp{i}")(h)
            m = nn.Dense(2 * self.dim, name=f"mlp{i}_in")(m)
            h = h + nn.Dense(self.dim, name=f"mlp{i}_out")(nn.gelu(m))
        h = nn.LayerNorm(name="ln_out")(h).mean(axis=-2)
        return h.reshape(*batch, self.dim)


class Classifier(nn.Module):
    """``head(backbone(x))``: parameters ``{"backbone": ..., "head": {"kernel", "bias"}}``."""

    backbone: nn.Module
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes, name="head")(self.backbone(x))


def make_model(name: str = "mlp") -> Classifier:
    """The classifier with backbone ``"mlp"`` (64→128→128), ``"cnn"`` (small conv net) or
    ``"vit"`` (tiny transformer on 2×2 patches, :class:`ViTBackbone`)."""
    if name == "mlp":
        return Classifier(backbone=MLPBackbone())
    if name == "cnn":
        return Classifier(backbone=CNNBackbone())
    if name == "vit":
        return Classifier(backbone=ViTBackbone())
    raise ValueError(f"unknown model {name!r}; expected 'mlp', 'cnn' or 'vit'.")


def init_params(model: nn.Module, seed: int = 0) -> PyTree:
    """Initial variables ``{"params": {"backbone": ..., "head": ...}}`` (float32).

    Kernels are drawn N(0, 1/fan_in) (fan_in = product of all but the last axis, LeCun
    normal; the first axis for attention's query/key/value kernels), LayerNorm scales are one,
    from ``numpy.random.default_rng(seed)`` and biases are zero: the same numbers on
    every backend, and nothing to compile (the shapes come from ``jax.eval_shape``).
    """
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64), jnp.float32)
    )
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            # Attention's query/key/value kernels are (d_in, heads, head_dim): fan_in = d_in.
            qkv = any(f"['{k}']" in name for k in ("query", "key", "value"))
            fan_in = s.shape[0] if qkv else math.prod(s.shape[:-1])
            return jnp.asarray(rng.standard_normal(s.shape) / math.sqrt(fan_in), s.dtype)
        if name.endswith("['scale']"):  # LayerNorm
            return jnp.ones(s.shape, s.dtype)
        return jnp.zeros(s.shape, s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


# ---------------------------------------------------------------------------------------------
# Training


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _single_loss(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    return _cross_entropy(model.apply(params, x), y)


def _multi_loss(model: nn.Module, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    # params: {"backbone": b, "heads": stacked heads (T, ...)}; x (T, B, 64), y (T, B).
    def one(head, xt, yt):
        return _single_loss(
            model, with_head({"params": {"backbone": params["backbone"]}}, head), xt, yt
        )

    return jax.vmap(one)(params["heads"], x, y).mean()


_CHUNK = 50  # steps per jitted scan; a fixed length, so one compilation serves every run


def _optimizer(params: PyTree, lr: float, head_only: bool) -> optax.GradientTransformation:
    """Adam; with ``head_only`` the backbone's updates are zero (a linear probe)."""
    if not head_only:
        return optax.adam(lr)
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "freeze" if "backbone" in jax.tree_util.keystr(path) else "train", params
    )
    return optax.multi_transform({"train": optax.adam(lr), "freeze": optax.set_to_zero()}, labels)


@functools.partial(jax.jit, static_argnames=("model", "multitask", "lr", "head_only"))
def _train_steps(
    params, opt_state, x, y, batches, num_active, *, model, multitask, lr, head_only=False
):
    """len(batches) Adam steps on x[batches[i]]; steps i ≥ num_active leave the state as is."""
    tx = _optimizer(params, lr, head_only)
    loss = _multi_loss if multitask else _single_loss

    def step(carry, inputs):
        p, s = carry
        idx, i = inputs
        xb, yb = jnp.take(x, idx, axis=-2), jnp.take(y, idx, axis=-1)
        value, grads = jax.value_and_grad(lambda q: loss(model, q, xb, yb))(p)
        updates, s_new = tx.update(grads, s, p)
        p_new = optax.apply_updates(p, updates)
        keep = i < num_active
        p, s = jax.tree.map(lambda a, b: jnp.where(keep, a, b), (p_new, s_new), (p, s))
        return (p, s), value

    (params, opt_state), losses = jax.lax.scan(
        step, (params, opt_state), (batches, jnp.arange(batches.shape[0]))
    )
    return params, opt_state, losses


def _fit(
    model: nn.Module,
    params: PyTree,
    x: np.ndarray,
    y: np.ndarray,
    *,
    multitask: bool,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool,
    desc: str,
    head_only: bool = False,
) -> PyTree:
    opt_state = _optimizer(params, lr, head_only).init(params)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
    rng = np.random.default_rng(seed)
    n = x.shape[-2]
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for i in range(math.ceil(steps / _CHUNK)):
            size = min(_CHUNK, steps - i * _CHUNK)
            batches = rng.integers(0, n, size=(_CHUNK, batch_size), dtype=np.int32)
            params, opt_state, losses = _train_steps(
                params,
                opt_state,
                x,
                y,
                batches,
                jnp.int32(size),
                model=model,
                multitask=multitask,
                lr=float(lr),
                head_only=head_only,
            )
            bar.update(size)
            bar.set_postfix(loss=f"{float(losses[size - 1]):.3f}")
    return params


def train(
    model: nn.Module,
    params: PyTree,
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    head_only: bool = False,
) -> PyTree:
    """Minimise the mean softmax cross-entropy of ``model`` on (x, y) with Adam.

    With ``head_only`` only ``params["params"]["head"]`` moves (the backbone's updates are
    zero): a linear probe on the backbone's features, the first stage of LP-FT (Kumar et al.,
    "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution",
    ICLR 2022), which starts fine-tuning from a head that already fits the task.

    Each step draws ``batch_size`` examples uniformly with replacement
    (``numpy.random.default_rng(seed)``, the same stream on every backend); the steps run as
    jitted ``lax.scan`` chunks of 50 (one compilation serves any ``steps``).

    Args:
      model: a :class:`Classifier`.
      params: the starting variables.
      x: inputs (N, 64). y: integer labels (N,).
      steps, lr, batch_size, seed: the optimisation.
      progress: show a tqdm bar. desc: its label.
      head_only: train the head alone (see above).

    Returns:
      The trained variables, shaped like ``params``.
    """
    return _fit(
        model,
        params,
        x,
        y,
        multitask=False,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        desc=desc,
        head_only=head_only,
    )


def pretrain(
    model: nn.Module,
    data: DigitsData,
    *,
    steps: int = 400,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> PyTree:
    """θ0: train from :func:`init_params` (``seed``) on the :data:`PRETRAIN_VIEW` view."""
    x, y, _, _ = task_split(data, PRETRAIN_VIEW)
    return train(
        model,
        init_params(model, seed),
        x,
        y,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        desc="pretrain",
    )


def finetune(
    model: nn.Module,
    pretrained: PyTree,
    data: DigitsData,
    task: str,
    *,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> PyTree:
    """θ_t: fine-tune all of ``pretrained`` (backbone and head) on ``task``'s view.

    The batch stream is seeded by ``seed`` and the task's name, so tasks differ but each is
    reproducible.
    """
    x, y, _, _ = task_split(data, task)
    task_seed = seed * 1000 + 1 + list(_VIEWS).index(task)
    return train(
        model,
        pretrained,
        x,
        y,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=task_seed,
        progress=progress,
        desc=f"finetune {task}",
    )


def train_multitask(
    model: nn.Module,
    pretrained: PyTree,
    data: DigitsData,
    tasks: Sequence[str],
    *,
    steps: int = 600,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> tuple[PyTree, dict[str, PyTree]]:
    """The upper bound: one backbone trained jointly on all ``tasks``, one head per task.

    Starts from ``pretrained`` (every head from its head); each step takes ``batch_size``
    examples of every task and minimises the mean of the per-task losses.

    Returns:
      ``(params, heads)``: variables whose head is the first task's, and ``{task: head}``;
      evaluate with ``evaluate(model, params, heads, data, task)``.
    """
    tasks = list(tasks)
    xs = np.stack([task_split(data, t)[0] for t in tasks])
    ys = np.stack([data.y_train] * len(tasks))
    params, heads = fit_multitask(
        model,
        pretrained,
        xs,
        ys,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    return params, dict(zip(tasks, heads, strict=True))


def fit_multitask(
    model: nn.Module,
    pretrained: PyTree,
    xs: np.ndarray,
    ys: np.ndarray,
    *,
    steps: int = 600,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    heads: Sequence[PyTree] | None = None,
) -> tuple[PyTree, list[PyTree]]:
    """Joint training on T tasks given as arrays: one backbone, one head per task.

    Args:
      model: a :class:`Classifier`. pretrained: the starting variables (every head starts
        from its head, unless ``heads`` gives T starting heads, e.g. linear probes).
      xs: inputs (T, N, 64); ys: integer labels (T, N) (task t's own labels).
      steps, lr, batch_size, seed, progress: as :func:`train`; each step takes ``batch_size``
        examples of every task and minimises the mean of the T losses.

    Returns:
      ``(params, heads)``: variables with the first task's head, and the T heads in order.
    """
    num_tasks = int(np.shape(xs)[0])
    if heads is None:
        heads = [pretrained["params"]["head"]] * num_tasks
    if len(heads) != num_tasks:
        raise ValueError(f"heads: expected {num_tasks} (one per task); got {len(heads)}.")
    init = {
        "backbone": pretrained["params"]["backbone"],
        "heads": jax.tree.map(lambda *h: jnp.stack(h), *heads),
    }
    out = _fit(
        model,
        init,
        xs,
        ys,
        multitask=True,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed * 1000 + 999,
        progress=progress,
        desc="multitask",
    )
    heads = [jax.tree.map(lambda h, i=i: h[i], out["heads"]) for i in range(num_tasks)]
    params = with_head({"params": {"backbone": out["backbone"]}}, heads[0])
    return params, heads


# ---------------------------------------------------------------------------------------------
# Evaluation


@functools.partial(jax.jit, static_argnames=("model",))
def _accuracy(model, params, x, y):
    return jnp.mean(jnp.argmax(model.apply(params, x), axis=-1) == y)


def accuracy(model: nn.Module, params: PyTree, x: np.ndarray, y: np.ndarray) -> float:
    """Share of ``x`` whose arg-max logit equals ``y``."""
    return float(_accuracy(model, params, jnp.asarray(x, jnp.float32), jnp.asarray(y)))


def with_head(params: PyTree, head: PyTree) -> PyTree:
    """``params`` with ``params["params"]["head"]`` replaced by ``head`` (a new dict)."""
    inner = dict(params["params"])
    inner["head"] = head
    return {**params, "params": inner}


def heads_of(finetuned: Sequence[PyTree], tasks: Sequence[str]) -> dict[str, PyTree]:
    """``{task: θ_t["params"]["head"]}``: each fine-tuned model's own head."""
    return {t: p["params"]["head"] for t, p in zip(tasks, finetuned, strict=True)}


def evaluate(
    model: nn.Module,
    merged: PyTree,
    heads: Mapping[str, PyTree],
    data: DigitsData,
    task: str,
) -> float:
    """Test accuracy on ``task`` of the backbone of ``merged`` with ``heads[task]``.

    The head of ``merged`` itself is ignored (after a merge with ``exclude=r"head"`` it is the
    pretrained head); each task keeps its own fine-tuned head.
    """
    _, _, x, y = task_split(data, task)
    return accuracy(model, with_head(merged, heads[task]), x, y)


def evaluate_all(
    model: nn.Module,
    merged: PyTree,
    heads: Mapping[str, PyTree],
    data: DigitsData,
    tasks: Sequence[str],
) -> dict[str, float]:
    """``{task: evaluate(model, merged, heads, data, task)}`` for every task."""
    return {t: evaluate(model, merged, heads, data, t) for t in tasks}


def normalized_accuracy(accs: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """(1/T) Σ_t accs[t] / reference[t], over the tasks of ``reference`` (the fine-tuned
    models' own accuracies)."""
    return float(np.mean([accs[t] / reference[t] for t in reference]))


# ---------------------------------------------------------------------------------------------
# Curvature inputs


@dataclasses.dataclass(frozen=True)
class LogitsFn:
    """``logits_fn(params, x) = model.apply(params, x)``: logits (N, 10) for inputs (N, 64).

    Hashable and compared by the model, so the curvature routines' jit caches are shared by
    every task (the task is in the inputs, not in the function). Suits
    ``jmerge.curvature.fisher.fisher_diag(logits_fn, params, inputs, labels, kind=...)`` and
    ``jmerge.curvature.operators.fisher_operator(logits_fn, params, inputs)``.
    """

    model: nn.Module

    def __call__(self, params: PyTree, x: jax.Array) -> jax.Array:
        return self.model.apply(params, x)


@dataclasses.dataclass(frozen=True)
class LossFn:
    """``loss_fn(params, (x, y))``: mean softmax cross-entropy, for ``jmerge.hvp`` /
    ``hessian_operator``."""

    model: nn.Module

    def __call__(self, params: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        return _cross_entropy(self.model.apply(params, x), y)


def curvature_inputs(
    data: DigitsData, task: str, num_examples: int = 256, seed: int = 0
) -> tuple[jax.Array, jax.Array]:
    """A fixed random subset of ``task``'s training view for estimating its curvature.

    Returns:
      ``(x, y)``: float32 (n, 64) inputs and int32 (n,) labels, n = min(num_examples, N).
    """
    x, y, _, _ = task_split(data, task)
    n = min(int(num_examples), x.shape[0])
    idx = np.sort(
        np.random.default_rng([seed, list(_VIEWS).index(task)]).permutation(x.shape[0])[:n]
    )
    return jnp.asarray(x[idx], jnp.float32), jnp.asarray(y[idx], jnp.int32)


# ---------------------------------------------------------------------------------------------
# Everything at once


@dataclasses.dataclass
class Benchmark:
    """A trained digits benchmark: what every merge needs and the reference accuracies.

    Attributes:
      model: the classifier. data: the split. tasks: task names, in order.
      pretrained: θ0. finetuned: [θ_t] in task order. heads: {task: θ_t's head}.
      multitask: (params, heads) of the jointly trained upper bound.
      finetuned_acc: {task: acc(θ_t, task)}, the normalizers.
      pretrained_acc: {task: acc(θ0 with its own head, task)}.
      train_seconds: wall time of all training.
    """

    model: Classifier
    data: DigitsData
    tasks: list[str]
    pretrained: PyTree
    finetuned: list[PyTree]
    heads: dict[str, PyTree]
    multitask: tuple[PyTree, dict[str, PyTree]]
    finetuned_acc: dict[str, float]
    pretrained_acc: dict[str, float]
    train_seconds: float

    def evaluate(self, merged: PyTree, heads: Mapping[str, PyTree] | None = None) -> dict:
        """``{task: acc}`` of ``merged``'s backbone with ``heads`` (default: the fine-tuned)."""
        return evaluate_all(
            self.model, merged, self.heads if heads is None else heads, self.data, self.tasks
        )

    def normalized(self, accs: Mapping[str, float]) -> float:
        """Mean over tasks of accs / fine-tuned accuracy."""
        return normalized_accuracy(accs, self.finetuned_acc)


def build_benchmark(
    *,
    model: str = "mlp",
    num_tasks: int = 6,
    seed: int = 0,
    pretrain_steps: int = 400,
    finetune_steps: int = 300,
    multitask_steps: int | None = None,
    lr: float = 1e-3,
    batch_size: int = 64,
    progress: bool = True,
) -> Benchmark:
    """Pretrain, fine-tune on the first ``num_tasks`` views of :data:`TASKS`, train the
    multitask upper bound (``multitask_steps`` default 2 × ``finetune_steps``), and measure.
    """
    import time

    if not 1 <= num_tasks <= len(TASKS):
        raise ValueError(f"num_tasks must be in [1, {len(TASKS)}], got {num_tasks}.")
    start = time.perf_counter()
    clf = make_model(model)
    data = load_data(seed)
    tasks = list(TASKS)[:num_tasks]
    theta0 = pretrain(
        clf, data, steps=pretrain_steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress
    )
    finetuned = [
        finetune(
            clf,
            theta0,
            data,
            t,
            steps=finetune_steps,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
        for t in tasks
    ]
    mt_steps = 2 * finetune_steps if multitask_steps is None else multitask_steps
    multitask = train_multitask(
        clf,
        theta0,
        data,
        tasks,
        steps=mt_steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    jax.block_until_ready((finetuned, multitask))
    heads = heads_of(finetuned, tasks)
    ft_acc = {t: evaluate(clf, p, heads, data, t) for t, p in zip(tasks, finetuned, strict=True)}
    pre_acc = {t: accuracy(clf, theta0, *task_split(data, t)[2:]) for t in tasks}
    return Benchmark(
        clf,
        data,
        tasks,
        theta0,
        finetuned,
        heads,
        multitask,
        ft_acc,
        pre_acc,
        time.perf_counter() - start,
    )
