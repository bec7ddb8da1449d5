"""jmerge.config: mergekit 0.1.5's YAML model, its errors, and per-tensor parameter resolution.

Expected values are derived by hand from mergekit 0.1.5's source:
  config.py evaluate_setting (gradient: s = t·(n−1), i = int(s), j = min(n−1, i+1),
    (1 − (s−i))·v_i + (s−i)·v_j; non-numeric lists pick v[int(t·(n−1))]; conditions: the
    first with filter None / "*" / a substring of the tensor name),
  plan.py plan_slice (t = idx/(L−1), or 1 when L = 1) and plan_module (t = 0 for the
    embeddings and the final norm / head),
  parameter_resolver.py resolve_parameter (per-model scope first, then top-level; a None
    result falls through; then the default, or "Missing required parameter"),
  plan.py normalize_config (base_model appended to the inputs when not listed).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jmerge.config import (
    ConfigError,
    MergeConfig,
    evaluate_setting,
    layer_fraction,
    layer_index,
    load_config,
    resolve_parameters,
)


def _ties(**top):
    return {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [
            {"model": "org/a", "parameters": {"weight": 1.0, "density": [1.0, 0.7, 0.1]}},
            {"model": "org/b", "parameters": {
                "weight": [{"filter": "self_attn", "value": 0.5},
                           {"filter": "mlp", "value": [0.2, 0.8]},
                           {"value": 1.5}],
                "density": "5e-1"}},
        ],
        "parameters": {"normalize": [True, False, True], **top},
        "dtype": "bfloat16",
    }


L = 8
# tensor name -> (weight of a, weight of b, density of a, density of b, normalize)
TIES_TABLE = {
    # t = 0 outside the layers: density of a = v0 = 1.0; b's weight: no filter matches -> 1.5
    "model.embed_tokens.weight": (1.0, 1.5, 1.0, 0.5, True),
    "lm_head.weight": (1.0, 1.5, 1.0, 0.5, True),
    "model.norm.weight": (1.0, 1.5, 1.0, 0.5, True),
    # layer 0: t = 0
    "model.layers.0.mlp.up_proj.weight": (1.0, 0.2, 1.0, 0.5, True),
    # layer 3: t = 3/7, s = 6/7: density = 1/7·1.0 + 6/7·0.7 = 0.742857…; normalize picks
    # index int(3/7·2) = 0 -> True
    "model.layers.3.self_attn.q_proj.weight": (1.0, 0.5, 1 / 7 + 6 / 7 * 0.7, 0.5, True),
    # layer 4: t = 4/7, s = 8/7: density = 6/7·0.7 + 1/7·0.1; mlp: 3/7·0.2 + 4/7·0.8;
    # normalize index int(8/7) = 1 -> False
    "model.layers.4.mlp.down_proj.weight": (1.0, 3 / 7 * 0.2 + 4 / 7 * 0.8,
                                            6 / 7 * 0.7 + 1 / 7 * 0.1, 0.5, False),
    # layer 7: t = 1: last values
    "model.layers.7.input_layernorm.weight": (1.0, 1.5, 0.1, 0.5, True),
}


class TestResolve:
    @pytest.mark.parametrize("name", list(TIES_TABLE))
    def test_ties_table(self, name):
        config = load_config(_ties())
        per_model, global_ = resolve_parameters(config, name, L)
        wa, wb, da, db, normalize = TIES_TABLE[name]
        np.testing.assert_allclose(per_model["weight"], [wa, wb], rtol=1e-14)
        np.testing.assert_allclose(per_model["density"], [da, db], rtol=1e-14)
        assert global_ == {"int8_mask": False, "normalize": normalize, "rescale": False,
                           "lambda": 1.0}
        assert per_model["weight"].dtype == np.float64

    def test_order_of_conditions_and_star(self):
        # the first matching condition wins: a filterless one first matches everything
        config = load_config(_ties() | {"parameters": {"lambda": [
            {"value": 2.0}, {"filter": "mlp", "value": 3.0}]}})
        assert resolve_parameters(config, "model.layers.1.mlp.x", L).global_["lambda"] == 2.0
        config = load_config(_ties() | {"parameters": {"lambda": [
            {"filter": "*", "value": 4.0}, {"filter": "mlp", "value": 3.0}]}})
        assert resolve_parameters(config, "model.layers.1.mlp.x", L).global_["lambda"] == 4.0

    def test_precedence_and_fall_through(self):
        raw = _ties()
        raw["parameters"] = {"weight": 0.25, "density": 0.9, "lambda": 0.5}
        raw["models"][1]["parameters"] = {"weight": [{"filter": "mlp", "value": 0.3}]}
        config = load_config(raw)
        # b's weight: its own condition where it matches, else the top-level 0.25
        mlp = resolve_parameters(config, "model.layers.2.mlp.w", L)
        attn = resolve_parameters(config, "model.layers.2.self_attn.w", L)
        np.testing.assert_allclose(mlp.per_model["weight"], [1.0, 0.3])
        np.testing.assert_allclose(attn.per_model["weight"], [1.0, 0.25])
        # b has no density of its own: the top-level 0.9
        np.testing.assert_allclose(attn.per_model["density"][1], 0.9)
        assert attn.global_["lambda"] == 0.5

    def test_required_parameter_matching_nothing(self):
        raw = _ties()
        raw["models"][1]["parameters"] = {"weight": [{"filter": "mlp", "value": 0.3}]}
        config = load_config(raw)
        with pytest.raises(ConfigError, match=r"missing required parameter 'weight' of ties "
                                              r"for model 'org/b', tensor 'model.norm.weight'"):
            resolve_parameters(config, "model.norm.weight", L)

    def test_single_layer_uses_t_one(self):
        config = load_config(_ties())
        per_model, _ = resolve_parameters(config, "model.layers.0.mlp.w", 1)
        np.testing.assert_allclose(per_model["density"][0], 0.1)

    def test_explicit_layer(self):
        config = load_config(_ties())
        per_model, _ = resolve_parameters(config, "custom.w", L, layer=7)
        np.testing.assert_allclose(per_model["density"][0], 0.1)
        per_model, _ = resolve_parameters(config, "model.layers.7.w", L, layer=None)
        np.testing.assert_allclose(per_model["density"][0], 1.0)

    def test_linear_appends_base_as_input(self):
        config = load_config({
            "merge_method": "linear", "base_model": "base",
            "models": [{"model": "a", "parameters": {"weight": 2.0}}, {"model": "b"}],
            "parameters": {"weight": 1.0},
        })
        assert config.stack == ("a", "b", "base") and config.base is None
        per_model, global_ = resolve_parameters(config, "x", 4)
        np.testing.assert_allclose(per_model["weight"], [2.0, 1.0, 1.0])
        assert global_ == {"normalize": True}

    def test_base_listed_among_models_is_not_stacked(self):
        raw = _ties()
        raw["models"].insert(0, {"model": "org/base"})
        config = load_config(raw)
        assert config.inputs == ("org/base", "org/a", "org/b")
        assert config.stack == ("org/a", "org/b") and config.base == "org/base"

    @settings(max_examples=40, deadline=None)
    @given(values=st.lists(st.floats(-10, 10), min_size=1, max_size=7),
           layers=st.integers(1, 40), data=st.data())
    def test_gradient_is_numpy_interp(self, values, layers, data):
        i = data.draw(st.integers(0, layers - 1))
        t = layer_fraction(i, layers)
        got = evaluate_setting(tuple(values), "model.layers.0.x", t)
        want = np.interp(t, np.linspace(0, 1, len(values)), values)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize(("name", "index"), [
        ("model.layers.12.self_attn.q_proj.weight", 12),
        ("transformer.h.3.attn.c_attn.weight", 3),
        ("model.decoder.layers.0.fc1.bias", 0),
        ("blocks.5.mlp", 5),
        ("model.embed_tokens.weight", None),
        ("lm_head.weight", None),
        ("model.layers_norm.weight", None),
    ])
    def test_layer_index(self, name, index):
        assert layer_index(name) == index


class TestLoad:
    def test_yaml_file_and_values(self, tmp_path):
        path = tmp_path / "merge.yaml"
        path.write_text(
            "merge_method: della\n"
            "base_model: base\n"
            "models:\n"
            "  - model: a\n"
            "    parameters: {weight: 1, density: 0.5, epsilon: 1e-2}\n"
            "  - model: b\n"
            "    parameters: {weight: 0.5}\n"
            "parameters: {normalize: yes, lambda: 1.1, density: 0.7}\n"
            "dtype: torch.float16\n"
            "tokenizer_source: base\n")
        config = load_config(path)
        assert isinstance(config, MergeConfig) and config.source == str(path)
        assert config.dtype == "float16" and config.tokenizer_source == "base"
        per_model, global_ = resolve_parameters(config, "model.layers.0.w", 2)
        np.testing.assert_allclose(per_model["epsilon"], [0.01, 0.15])  # "1e-2" is a str
        np.testing.assert_allclose(per_model["density"], [0.5, 0.7])
        assert global_["normalize"] is True and global_["rescale"] is True

    def test_error_names_file(self, tmp_path):
        path = tmp_path / "bad.yaml"
        path.write_text("merge_method: ties\nbase_model: x\nmodels: [{model: a}]\nfoo: 1\n")
        with pytest.raises(ConfigError, match=f"^{path}: unknown key 'foo'; allowed: "
                                              "merge_method, base_model, models"):
            load_config(path)

    def test_principled_methods(self):
        config = load_config({"merge_method": "fisher", "models": [{"model": "a"}, {
            "model": "b", "parameters": {"weight": 2}}], "parameters": {"eps": "1e-8"}})
        per_model, global_ = resolve_parameters(config, "w", 1)
        np.testing.assert_allclose(per_model["weight"], [1.0, 2.0])
        assert global_ == {"eps": 1e-8}
        config = load_config({"merge_method": "mats", "base_model": "p",
                              "models": [{"model": "a"}], "parameters": {"maxiter": 20.0}})
        assert resolve_parameters(config, "w", 1).global_["maxiter"] == 20

    @pytest.mark.parametrize(("change", "message"), [
        ({"merge_method": "tie"},
         r"unknown merge method 'tie'; allowed: linear, task_arithmetic, ties, .*, fisher, "
         r"regmean, mats, gradient_matching\."),
        ({"tokenizer_src": "base"}, r"unknown key 'tokenizer_src'; allowed: merge_method, "),
        ({"slices": [{"sources": []}]}, r"'slices' is not supported yet"),
        ({"models": [{"model": "a", "weight": 1.0}]},
         r"models\[0\]: unknown key 'weight'; allowed: model, parameters\."),
        ({"models": [{"model": "a", "parameters": {"wieght": 1.0}}]},
         r"models\[0\]\.parameters: unknown parameter 'wieght' for ties; allowed: weight, "
         r"density\."),
        ({"models": [{"model": "a", "parameters": {"weight": 1.0, "lambda": 2}}]},
         r"'lambda' is a global parameter of ties; set it under the top-level 'parameters'"),
        ({"parameters": {"normalise": True}},
         r"unknown parameter 'normalise' for ties; allowed: weight, density, int8_mask, "
         r"normalize, rescale, lambda\."),
        ({"parameters": {"normalize": "maybe"}}, r"parameters\.normalize: expected a boolean"),
        ({"parameters": {"lambda": [1.0, "x"]}},
         r"parameters\.lambda\[1\]: expected a finite number; got 'x'"),
        ({"parameters": {"lambda": [{"filter": "mlp", "val": 1}]}},
         r"parameters\.lambda\[0\]: unknown key 'val'; allowed: filter, value\."),
        ({"models": [{"model": "a"}]}, r"ties needs the parameter 'weight' for model 'a'"),
        ({"base_model": None}, r"merge method ties needs a 'base_model'"),
        ({"dtype": "int8"}, r"unknown dtype 'int8'; allowed: bfloat16, float16, float32, "),
        ({"tokenizer": {"source": "base"}, "tokenizer_source": "base"},
         r"either 'tokenizer_source' or 'tokenizer', not both"),
        ({"models": [{"model": "a", "parameters": {"weight": 1}},
                     {"model": "a", "parameters": {"weight": 1}}]},
         r"model\(s\) listed more than once: \['a'\]"),
        ({"merge_method": "nuslerp"}, r"nuslerp merges exactly 2 model\(s\) besides the base "
                                      r"model; got 3"),
        ({"merge_method": "sce"}, r"unknown parameter 'weight' for sce; allowed: none\."),
        ({"merge_method": "fisher", "parameters": {"damping": 1.0}},
         r"unknown parameter 'damping' for fisher; allowed: weight, eps\."),
    ])
    def test_errors_name_the_bad_item_and_list_the_allowed(self, change, message):
        raw = {
            "merge_method": "ties", "base_model": "base",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in "abc"],
        }
        raw.update(change)
        with pytest.raises(ConfigError, match=message):
            load_config(raw)

    def test_model_stock_and_slerp_counts(self):
        with pytest.raises(ConfigError, match=r"model_stock merges at least 2 model\(s\)"):
            load_config({"merge_method": "model_stock", "base_model": "b",
                         "models": [{"model": "a"}]})
        with pytest.raises(ConfigError, match=r"slerp merges exactly 1 model\(s\)"):
            load_config({"merge_method": "slerp", "base_model": "b", "parameters": {"t": 0.5},
                         "models": [{"model": "a"}, {"model": "c"}]})
        config = load_config({"merge_method": "slerp", "base_model": "b",
                              "parameters": {"t": [0, 1]},
                              "models": [{"model": "b"}, {"model": "a"}]})
        assert config.stack == ("a",) and config.base == "b"
        assert resolve_parameters(config, "model.layers.1.w", 5).global_["t"] == 0.25
