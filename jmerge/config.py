"""mergekit's YAML merge configuration: parsing, validation, per-tensor parameter resolution.

Follows mergekit 0.1.5: ``mergekit/config.py`` (``MergeConfiguration``, ``evaluate_setting``),
``mergekit/parameter_resolver.py`` (``resolve_parameter(s)``) and ``mergekit/plan.py``
(``MergePlanner``: the input order, the layer fraction t). A config looks like::

    merge_method: ties
    base_model: org/base
    models:
      - model: org/a
        parameters: {weight: 1.0, density: [1.0, 0.7, 0.1]}
      - model: org/b
        parameters:
          weight: [{filter: self_attn, value: 0.5}, {value: 1.0}]
          density: 0.5
    parameters: {normalize: true, lambda: 1.0}
    dtype: bfloat16

A parameter setting is a scalar; a list of scalars (a *gradient*: interpolated linearly over
the layer fraction t); or a list of ``{filter, value}`` conditions (the first whose ``filter``
is a substring of the tensor name, or has no filter / ``"*"``, gives the value, itself a
scalar or a gradient). Per-model ``parameters`` take precedence over the top-level
``parameters``, which may also hold per-model parameters (for every model); a setting that
resolves to nothing (no filter matched) falls through to the next scope, then to the
method's default.

Stricter than mergekit, which silently ignores unknown keys and parameter names: every unknown
key, method or parameter is an error that names it and lists the allowed ones, and so is a
global parameter set per model. ``slices`` and ``modules`` are not supported yet.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import yaml

from jmerge.merges.mergekit import METHODS as TENSOR_METHODS
from jmerge.merges.mergekit import REQUIRED, MethodSpec, Param

__all__ = [
    "ConfigError",
    "Condition",
    "ModelEntry",
    "MergeConfig",
    "ResolvedParameters",
    "METHODS",
    "PRINCIPLED_METHODS",
    "TOP_LEVEL_KEYS",
    "load_config",
    "layer_index",
    "layer_fraction",
    "evaluate_setting",
    "resolve_parameters",
]


class ConfigError(ValueError):
    """An invalid merge configuration; the message names the file, key and allowed values."""


# ---------------------------------------------------------------------------------------------
# Methods: mergekit's tensor methods and jmerge's principled merges (run by the executor)

_W1 = Param(float, 1.0, "weight of the model")

PRINCIPLED_METHODS: dict[str, MethodSpec] = {
    "fisher": MethodSpec(
        None, False, {"weight": _W1},
        {"eps": Param(float, 1e-12, "cut-off relative to the mean weighted Fisher")}, False,
        "Fisher merging (jmerge.fisher_merge): Σ w F θ / Σ w F", base="optional"),
    "regmean": MethodSpec(
        None, False, {"weight": _W1},
        {"alpha": Param(float, 1.0, "scale of the Grams' off-diagonal part"),
         "ridge": Param(float, 1e-6, "relative ridge of the per-layer solve")}, False,
        "RegMean (jmerge.regmean): per-layer Gram-weighted least squares", base="optional"),
    "mats": MethodSpec(
        None, True, {"weight": _W1},
        {"maxiter": Param(int, 100, "conjugate gradient iterations"),
         "rtol": Param(float, 1e-6, "relative residual tolerance"),
         "damping": Param(float, 0.0, "damping, relative to the mean curvature"),
         "init": Param(str, "task_arithmetic", "initialisation of CG"),
         "curvature": Param(str, "fisher", "curvature files read: fisher, gram or kfac")}, False,
        "MaTS (jmerge.mats): curvature-weighted merge solved by CG"),
    "gradient_matching": MethodSpec(
        None, True, {"weight": Param(float, 1.0, "the model's α")},
        {"prior": Param(float, 0.0, "prior precision δ, relative to the mean curvature"),
         "maxiter": Param(int, 100, "conjugate gradient iterations"),
         "rtol": Param(float, 1e-6, "relative residual tolerance")}, False,
        "uncertainty-based gradient matching (jmerge.gradient_matching, Daheim et al.)"),
}
"""jmerge's principled merges under their own YAML names (validated here, run by the CLI)."""

METHODS: dict[str, MethodSpec] = {**TENSOR_METHODS, **PRINCIPLED_METHODS}
"""Every ``merge_method`` the YAML accepts, by name."""

TOP_LEVEL_KEYS = (
    "merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "slices", "modules",
)
"""mergekit's ``MergeConfiguration`` fields (``slices`` and ``modules`` are rejected for now)."""

_MODEL_KEYS = ("model", "parameters")
_CONDITION_KEYS = ("filter", "value")
_TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
_DTYPES = ("bfloat16", "float16", "float32", "float64")  # common.dtype_from_name, floating


# ---------------------------------------------------------------------------------------------
# The config model

Scalar = bool | int | float | str


class Condition(NamedTuple):
    """One ``{filter, value}`` entry (mergekit ``ConditionalParameter``).

    Attributes:
      filter: a substring of tensor names, or None (also for ``"*"``): matches every tensor.
      value: a scalar or a gradient (tuple of scalars).
    """

    filter: str | None
    value: Scalar | tuple[Scalar, ...]


Setting = Scalar | tuple[Scalar, ...] | tuple[Condition, ...]
"""A validated parameter setting: a scalar, a gradient (tuple of scalars), or conditions."""


class ModelEntry(NamedTuple):
    """One entry of ``models``: the model reference (as written) and its parameter settings."""

    model: str
    parameters: Mapping[str, Setting]


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge configuration (mergekit ``MergeConfiguration``, ``models`` form).

    Attributes:
      merge_method: a key of :data:`METHODS`.
      models: the ``models`` entries, in order.
      base_model: the ``base_model`` reference or None.
      parameters: the top-level parameter settings.
      dtype, out_dtype: ``bfloat16``/``float16``/``float32``/``float64`` or None
        (a ``torch.`` prefix is dropped). mergekit casts the inputs to ``dtype`` and the
        output to ``out_dtype``.
      tokenizer_source, tokenizer, chat_template: passed through as written.
      source: the file the config came from (for messages), or None.
    """

    merge_method: str
    models: tuple[ModelEntry, ...]
    base_model: str | None = None
    parameters: Mapping[str, Setting] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: Mapping[str, Any] | None = None
    chat_template: str | None = None
    source: str | None = None

    @property
    def spec(self) -> MethodSpec:
        """The method's :class:`jmerge.merges.mergekit.MethodSpec`."""
        return METHODS[self.merge_method]

    @property
    def inputs(self) -> tuple[str, ...]:
        """mergekit's input order (plan.py ``normalize_config``): the listed models, then
        ``base_model`` if it is not listed."""
        names = tuple(m.model for m in self.models)
        if self.base_model is not None and self.base_model not in names:
            names += (self.base_model,)
        return names

    @property
    def base(self) -> str | None:
        """The model whose tensor is the method's ``base`` argument, or None (no base model,
        or a method that takes the base as an ordinary input, i.e. ``linear``)."""
        return None if self.spec.base == "input" else self.base_model

    @property
    def stack(self) -> tuple[str, ...]:
        """The models whose tensors form the ``tensors`` stack (N, *s), in order; per-model
        parameter arrays from :func:`resolve_parameters` are aligned with it."""
        return tuple(m for m in self.inputs if m != self.base)


# ---------------------------------------------------------------------------------------------
# Validation of values


_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


def _validate(value: Any, kind: type, where: str) -> Scalar:
    """A scalar validated to the parameter's type, as pydantic's lax mode does for mergekit
    (``ParameterSpec.validate``): floats also from ints, bools and numeric strings (YAML reads
    ``1e-3`` as a string); bools also from 0/1 and yes/no/on/off/true/false strings."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{where}: expected a boolean (true/false); got {value!r}.")
    if kind in (float, int):
        number: float | None = None
        if isinstance(value, (bool, int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number; got {value!r}.")
        if kind is int:
            if number != int(number):
                raise ConfigError(f"{where}: expected an integer; got {value!r}.")
            return int(number)
        return number
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string; got {value!r}.")
        return value
    raise TypeError(f"unsupported parameter type {kind!r}")  # pragma: no cover


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (bool, int, float, str))


def _parse_value(raw: Any, kind: type, where: str) -> Scalar | tuple[Scalar, ...]:
    if _is_scalar(raw):
        return _validate(raw, kind, where)
    if isinstance(raw, list) and all(_is_scalar(e) for e in raw):
        return tuple(_validate(e, kind, f"{where}[{i}]") for i, e in enumerate(raw))
    raise ConfigError(f"{where}: expected a scalar or a list of scalars (a gradient); "
                      f"got {raw!r}.")


def _parse_setting(raw: Any, kind: type, where: str) -> Setting:
    """mergekit ``ParameterSetting``: scalar | gradient | condition | list of conditions."""
    if isinstance(raw, Mapping):
        raw = [raw]
    if isinstance(raw, list) and raw and any(isinstance(e, Mapping) for e in raw):
        conditions = []
        for i, c in enumerate(raw):
            w = f"{where}[{i}]"
            if not isinstance(c, Mapping):
                raise ConfigError(f"{w}: a list of conditions must hold only "
                                  f"{{filter, value}} mappings; got {c!r}.")
            _check_keys(c, _CONDITION_KEYS, w)
            if "value" not in c:
                raise ConfigError(f"{w}: a condition needs a 'value'.")
            f = c.get("filter")
            if f is not None and not isinstance(f, str):
                raise ConfigError(f"{w}.filter: expected a string; got {f!r}.")
            conditions.append(Condition(None if f in (None, "*") else f,
                                        _parse_value(c["value"], kind, f"{w}.value")))
        return tuple(conditions)
    return _parse_value(raw, kind, where)


def _check_keys(d: Mapping, allowed: tuple[str, ...] | list[str], where: str, what="key") -> None:
    for k in d:
        if k not in allowed:
            raise ConfigError(f"{where}: unknown {what} {k!r}; allowed: {', '.join(allowed)}.")


def _parse_parameters(raw: Any, spec: MethodSpec, method: str, where: str,
                      per_model_only: bool) -> dict[str, Setting]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of parameter names to settings; "
                          f"got {raw!r}.")
    allowed = list(spec.per_model) if per_model_only else [*spec.per_model, *spec.global_]
    out = {}
    for name, value in raw.items():
        if name not in allowed:
            if per_model_only and name in spec.global_:
                raise ConfigError(
                    f"{where}: {name!r} is a global parameter of {method}; set it under the "
                    f"top-level 'parameters'. Per-model parameters of {method}: "
                    f"{', '.join(spec.per_model) or 'none'}.")
            raise ConfigError(f"{where}: unknown parameter {name!r} for {method}; allowed: "
                              f"{', '.join(allowed) or 'none'}.")
        p = spec.per_model.get(name) or spec.global_[name]
        out[name] = _parse_setting(value, p.type, f"{where}.{name}")
    return out


def _dtype(raw: Any, where: str) -> str | None:
    if raw is None:
        return None
    name = raw[len("torch."):] if isinstance(raw, str) and raw.startswith("torch.") else raw
    if name not in _DTYPES:
        raise ConfigError(f"{where}: unknown dtype {raw!r}; allowed: {', '.join(_DTYPES)}.")
    return name


def _model_ref(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError(f"{where}: expected a model reference (a path or hub id string); "
                          f"got {raw!r}.")
    return raw


def load_config(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> MergeConfig:
    """Read and validate a mergekit YAML merge configuration.

    Args:
      path_or_dict: a YAML file's path, or the already parsed mapping.

    Returns:
      A :class:`MergeConfig`.

    Raises:
      ConfigError: an unknown top-level key, model key, method or parameter (naming it and
        listing the allowed ones); a global parameter set per model; a value of the wrong
        type; a required parameter set nowhere; a missing ``base_model`` for a method that
        needs one; the wrong number of models; duplicate models; ``slices``/``modules``;
        both ``tokenizer_source`` and ``tokenizer``. Messages start with the file name.
    """
    source = None
    if isinstance(path_or_dict, Mapping):
        raw = path_or_dict
    else:
        source = os.fspath(path_or_dict)
        with open(source, encoding="utf-8") as f:
            try:
                docs = list(yaml.safe_load_all(f))
            except yaml.YAMLError as e:
                raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if len(docs) != 1:
            raise ConfigError(f"{source}: expected one YAML document; got {len(docs)}.")
        raw = docs[0]
    where = source or "config"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top level; got {raw!r}.")
    _check_keys(raw, TOP_LEVEL_KEYS, where)
    for key in ("slices", "modules"):
        if raw.get(key) is not None:
            raise ConfigError(f"{where}: '{key}' is not supported yet; list the models under "
                              "'models' (every layer of each model is merged).")

    method = raw.get("merge_method")
    if method is None:
        raise ConfigError(f"{where}: 'merge_method' is required; allowed: "
                          f"{', '.join(METHODS)}.")
    if method not in METHODS:
        raise ConfigError(f"{where}.merge_method: unknown merge method {method!r}; allowed: "
                          f"{', '.join(METHODS)}.")
    spec = METHODS[method]
    base_model = None if raw.get("base_model") is None else _model_ref(
        raw["base_model"], f"{where}.base_model")

    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError(f"{where}.models: expected a non-empty list of "
                          f"{{model, parameters}} entries; got {models_raw!r}.")
    models = []
    for i, m in enumerate(models_raw):
        w = f"{where}.models[{i}]"
        if not isinstance(m, Mapping):
            raise ConfigError(f"{w}: expected a mapping with keys {', '.join(_MODEL_KEYS)}; "
                              f"got {m!r}.")
        _check_keys(m, _MODEL_KEYS, w)
        if "model" not in m:
            raise ConfigError(f"{w}: 'model' is required.")
        name = _model_ref(m["model"], f"{w}.model")
        params = _parse_parameters(m.get("parameters"), spec, method, f"{w}.parameters",
                                   per_model_only=True)
        models.append(ModelEntry(name, params))
    names = [m.model for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}.models: model(s) listed more than once: {dupes}.")
    parameters = _parse_parameters(raw.get("parameters"), spec, method, f"{where}.parameters",
                                   per_model_only=False)

    tokenizer = raw.get("tokenizer")
    if tokenizer is not None:
        if not isinstance(tokenizer, Mapping):
            raise ConfigError(f"{where}.tokenizer: expected a mapping; got {tokenizer!r}.")
        _check_keys(tokenizer, _TOKENIZER_KEYS, f"{where}.tokenizer")
    if raw.get("tokenizer_source") is not None and tokenizer is not None:
        raise ConfigError(f"{where}: set either 'tokenizer_source' or 'tokenizer', not both.")
    for key in ("tokenizer_source", "chat_template"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ConfigError(f"{where}.{key}: expected a string; got {raw[key]!r}.")

    config = MergeConfig(
        merge_method=method,
        models=tuple(models),
        base_model=base_model,
        parameters=parameters,
        dtype=_dtype(raw.get("dtype"), f"{where}.dtype"),
        out_dtype=_dtype(raw.get("out_dtype"), f"{where}.out_dtype"),
        tokenizer_source=raw.get("tokenizer_source"),
        tokenizer=tokenizer,
        chat_template=raw.get("chat_template"),
        source=source,
    )
    _check_structure(config, where)
    return config


def _check_structure(config: MergeConfig, where: str) -> None:
    spec, method = config.spec, config.merge_method
    if spec.needs_base and config.base_model is None:
        raise ConfigError(f"{where}: merge method {method} needs a 'base_model'.")
    non_base = [m for m in config.inputs if m != config.base_model]
    if spec.base == "input":
        non_base = list(config.inputs)
    lo, hi = spec.num_models
    if len(non_base) < lo or (hi is not None and len(non_base) > hi):
        want = f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else
                                                 f"{lo} to {hi}")
        raise ConfigError(f"{where}.models: {method} merges {want} model(s) besides the base "
                          f"model; got {len(non_base)}: {non_base}.")
    for name, p in config.spec.global_.items():
        if p.default is REQUIRED and name not in config.parameters:
            raise ConfigError(f"{where}.parameters: {method} needs the parameter {name!r}.")
    per_model_entries = {m.model: m.parameters for m in config.models}
    for model in config.stack:
        for name, p in spec.per_model.items():
            if p.default is REQUIRED and name not in config.parameters and name not in \
                    per_model_entries.get(model, {}):
                raise ConfigError(
                    f"{where}: {method} needs the parameter {name!r} for model {model!r} "
                    f"(set it in that model's 'parameters' or in the top-level 'parameters').")


# ---------------------------------------------------------------------------------------------
# Per-tensor resolution


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_index(tensor_name: str) -> int | None:
    """The layer index in a tensor name (``model.layers.<i>.``, ``transformer.h.<i>.``,
    ``...blocks.<i>.``), or None for a tensor outside the layers (embeddings, final norm,
    head). mergekit reads it from the architecture's weight templates instead."""
    m = _LAYER_RE.search(tensor_name)
    return None if m is None else int(m.group(1))


def layer_fraction(index: int | None, num_layers: int) -> float:
    """mergekit's t for gradients (plan.py ``plan_slice``/``plan_module``).

    t = i / (L − 1) for layer i of L (t = 1 if L = 1); t = 0 for tensors outside the layers
    (mergekit 0.1.5 plans the embeddings and the final norm / head with t = 0).
    """
    if index is None:
        return 0.0
    if not 0 <= index < num_layers:
        raise ValueError(f"layer index {index} out of range for num_layers={num_layers}.")
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate_setting(setting: Setting, tensor_name: str, t: float, kind: type = float) -> Any:
    """mergekit config.py ``evaluate_setting``: the value of one setting for one tensor.

    * scalar: itself;
    * gradient (v_0, …, v_{n−1}) of numbers: with s = t·(n−1), i = ⌊s⌋, j = min(n−1, i+1),
      (1 − (s − i)) v_i + (s − i) v_j — ``numpy.interp(t, linspace(0, 1, n), v)``;
      of booleans or strings: v_⌊t·(n−1)⌋;
    * conditions: the value of the first condition whose filter is None or a substring of
      ``tensor_name``; None if none matches (the caller falls through to the next scope).
    """
    if _is_scalar(setting):
        return setting
    if not setting:
        return None
    if isinstance(setting[0], Condition):
        for c in setting:
            if c.filter is None or (tensor_name and c.filter in tensor_name):
                return evaluate_setting(c.value, tensor_name, t, kind)
        return None
    values = list(setting)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    result = (1 - frac) * values[i0] + frac * values[i1]
    return _validate(result, kind, f"gradient {values} at t={t:g}")


class ResolvedParameters(NamedTuple):
    """Parameters of one tensor.

    Attributes:
      per_model: name -> array of shape (N,), aligned with :attr:`MergeConfig.stack`
        (float64 for float parameters, bool for booleans).
      global_: name -> Python value.
    """

    per_model: dict[str, np.ndarray]
    global_: dict[str, Any]


def resolve_parameters(
    config: MergeConfig,
    tensor_name: str,
    num_layers: int,
    *,
    layer: int | None | str = "auto",
) -> ResolvedParameters:
    """Every parameter of ``config``'s method for one tensor (mergekit parameter_resolver.py).

    A per-model parameter of model m is looked up in m's ``parameters``, then the top-level
    ``parameters``, then the method's default; a global parameter in the top-level
    ``parameters``, then the default. A setting that evaluates to nothing (no filter
    matched) falls through. Gradients are evaluated at t = :func:`layer_fraction` of the
    layer index (:func:`layer_index` of ``tensor_name`` unless ``layer`` gives it; None: not
    a layer tensor).

    Args:
      config: from :func:`load_config`.
      tensor_name: the tensor's name, e.g. ``model.layers.3.self_attn.q_proj.weight``.
      num_layers: the model's number of layers (``num_hidden_layers``).
      layer: ``"auto"`` (parse the name), an index, or None.

    Returns:
      :class:`ResolvedParameters` (a (per_model, global_) pair).

    Raises:
      ConfigError: a required parameter resolves to nothing for this tensor (naming the
        model and tensor).
    """
    index = layer_index(tensor_name) if layer == "auto" else layer
    t = layer_fraction(index, num_layers)
    spec, method = config.spec, config.merge_method
    where = config.source or "config"

    def lookup(name: str, p: Param, scopes, who: str) -> Any:
        for scope in scopes:
            if name in scope:
                value = evaluate_setting(scope[name], tensor_name, t, p.type)
                if value is not None:
                    return value
        if p.default is REQUIRED:
            raise ConfigError(f"{where}: missing required parameter {name!r} of {method} for "
                              f"{who}tensor {tensor_name!r} (no setting matched it).")
        return p.default

    global_ = {name: lookup(name, p, (config.parameters,), "")
               for name, p in spec.global_.items()}
    entries = {m.model: m.parameters for m in config.models}
    per_model = {}
    for name, p in spec.per_model.items():
        values = [lookup(name, p, (entries.get(m, {}), config.parameters), f"model {m!r}, ")
                  for m in config.stack]
        dtype = {bool: np.bool_, int: np.int64, float: np.float64}.get(p.type, object)
        per_model[name] = np.asarray(values, dtype=dtype)
    return ResolvedParameters(per_model, global_)
