"""kvtuner_jax.manifest: parsing, validation with JSON paths, KVTuner YAML presets, memory arithmetic, configs, CLI."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtuner_jax import assets
from kvtuner_jax import manifest as mf
from kvtuner_jax.errors import ManifestError
from kvtuner_jax.specs import KVSpec, LayerSpec, ModelIdentity

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
UPSTREAM = assets.kvtuner_presets_dir()
LLAMA_YAML = UPSTREAM / "Meta-Llama-3.1-8B-Instruct_kivi_KVTuner4_1.yaml"
QWEN_YAML = UPSTREAM / "Qwen2.5-7B-Instruct_pertoken_KVTuner4_0.yaml"
PER_HEAD_YAML = UPSTREAM / "meta-llama_Meta-Llama-3-8B-Instruct_k8_v4._per_head.yaml"
LLAMA31 = ModelIdentity("Meta-Llama-3.1-8B-Instruct", 32, 8, 128)
QWEN25 = ModelIdentity("Qwen2.5-7B-Instruct", 28, 4, 128)


def base_obj(model: ModelIdentity, layers=None, defaults=None) -> dict:
    obj = {"format": mf.FORMAT, "version": 1, "model": {**model.__dict__}}
    if defaults is not None:
        obj["defaults"] = defaults
    obj["layers"] = [{} for _ in range(model.num_layers)] if layers is None else layers
    return obj


def error_of(obj) -> ManifestError:
    with pytest.raises(ManifestError) as e:
        mf.Manifest.from_json(obj)
    return e.value


# ------------------------------------------------------------------------------------------------ parsing basics


def test_example_error_message(smollm2):
    layers = [{} for _ in range(30)]
    layers[7] = {"k_bits": 3}
    e = error_of(base_obj(smollm2, layers))
    assert str(e) == "layers[7].k_bits: 3 is not one of 2, 4, 8, 16" and e.path == "layers[7].k_bits"


def test_resolution_defaults_and_overrides(smollm2):
    obj = base_obj(smollm2, defaults={"k_bits": 8, "v_bits": 4, "v_axis": "channel", "v_group_size": 32})
    obj["layers"][3] = {"k_bits": 2, "k_symmetric": True, "residual_length": 16, "rotation": True}
    m = mf.Manifest.from_json(obj)
    assert m.num_layers == 30 and m.model == smollm2
    assert m.layer(0) == LayerSpec(k=KVSpec(8, "int", "token", 64, False), v=KVSpec(4, "int", "channel", 32, False))
    assert m.layer(3) == LayerSpec(
        k=KVSpec(2, "int", "token", 64, True),
        v=KVSpec(4, "int", "channel", 32, False),
        residual_length=16,
        rotation=True,
    )
    assert len(m.layer_specs()) == 30 and m.layer_bits()[3] == (2, 4)
    assert m.to_json() == obj  # defaults are not expanded into layers
    with pytest.raises(IndexError):
        m.layer(30)


def test_builtin_defaults_without_defaults_block(smollm2):
    m = mf.Manifest.from_json(base_obj(smollm2))
    assert all(s == LayerSpec(KVSpec(16, group_size=64), KVSpec(16, group_size=64)) for s in m.layer_specs())
    assert "defaults" not in m.to_json() and "metadata" not in m.to_json()


def test_layers_object_form_keyed_by_index_and_hf_names(smollm2):
    layers = {str(i): {"k_bits": 4, "v_bits": 2} for i in range(30)}
    del layers["7"], layers["12"]
    layers["model.layers.7.self_attn"] = {"k_bits": 8, "v_bits": 8}
    layers["model.layers.12"] = {"k_bits": 2, "v_bits": 2}
    m = mf.Manifest.from_json(base_obj(smollm2, layers))
    want = [(4, 2)] * 30
    want[7], want[12] = (8, 8), (2, 2)
    assert list(m.layer_bits()) == want
    assert isinstance(m.to_json()["layers"], list)  # normalised to the list form
    assert mf.Manifest.from_json(m.to_json()) == m
    assert mf.layer_index("model.layers.29.self_attn") == 29 and mf.module_name(29) == "model.layers.29.self_attn"
    assert mf.layer_index("7.self_attn") is None and mf.layer_index("model.layers.x") is None


@pytest.mark.parametrize(
    "layers,path,fragment",
    [
        ({**{str(i): {} for i in range(29)}}, "layers", "missing layer(s) 29"),
        ({**{str(i): {} for i in range(30)}, "model.layers.3": {}}, 'layers["model.layers.3"]', "given twice"),
        ({**{str(i): {} for i in range(30)}, "30": {}}, 'layers["30"]', "out of range"),
        ({**{str(i): {} for i in range(30)}, "layer3": {}}, 'layers["layer3"]', "not a layer key"),
        ([{}] * 29, "layers", "has 29 entries, model.num_layers is 30"),
        ("all", "layers", "expected an array or an object"),
    ],
)
def test_layers_structure_errors(smollm2, layers, path, fragment):
    e = error_of(base_obj(smollm2, layers))
    assert e.path == path and fragment in str(e)


@pytest.mark.parametrize(
    "mutate,path,fragment",
    [
        (lambda o: o.update(extra=1), "extra", "unknown field"),
        (lambda o: o.update(format="gguf"), "format", '"gguf" is not "kvtuner-jax-manifest"'),
        (lambda o: o.update(version=2), "version", "2 is not 1"),
        (lambda o: o.pop("model"), "model", "missing"),
        (lambda o: o["model"].pop("head_dim"), "model.head_dim", "missing"),
        (lambda o: o["model"].update(head_dim=0), "model.head_dim", "not a positive integer"),
        (lambda o: o["model"].update(num_kv_heads="3"), "model.num_kv_heads", "not a positive integer"),
        (lambda o: o["model"].update(hidden=576), "model.hidden", "unknown field"),
        (lambda o: o.update(defaults={"kbits": 4}), "defaults.kbits", "unknown field"),
        (lambda o: o.update(defaults={"k_bits": 4.0}), "defaults.k_bits", "4.0 is not one of 2, 4, 8, 16"),
        (lambda o: o.update(defaults={"k_bits": True}), "defaults.k_bits", "true is not one of"),
        (lambda o: o.update(defaults={"rotation": 1}), "defaults.rotation", "is an integer, expected true or false"),
        (lambda o: o.update(defaults={"k_axis": "head"}), "defaults.k_axis", '"head" is not one of "token"'),
        (lambda o: o.update(defaults={"scale_dtype": "float32"}), "defaults.scale_dtype", "not one of"),
        (lambda o: o.update(defaults={"residual_length": -1}), "defaults.residual_length", "non-negative"),
        (lambda o: o.update(defaults={"k_mode": "fp6"}), "defaults.k_mode", '"fp6" is not one of "bf16", "fp8", "int"'),
        (lambda o: o.update(defaults=[]), "defaults", "expected an object"),
        (lambda o: o.update(metadata="x"), "metadata", "expected an object"),
        (lambda o: o["layers"].__setitem__(4, 8), "layers[4]", "is an integer, expected an object"),
        (lambda o: o["layers"].__setitem__(4, {"v_group_size": 0}), "layers[4].v_group_size", "positive integer"),
    ],
)
def test_field_errors_name_the_path(smollm2, mutate, path, fragment):
    obj = base_obj(smollm2)
    mutate(obj)
    e = error_of(obj)
    assert e.path == path and fragment in str(e), str(e)


def test_group_size_rules(smollm2):
    def err(defaults, layer=None):
        obj = base_obj(smollm2, defaults=defaults)
        if layer:
            obj["layers"][5] = layer
        return error_of(obj)

    e = err({"k_bits": 4, "k_group_size": 48})
    assert e.path == "defaults.k_group_size" and "48 does not divide head_dim 64" in str(e)
    e = err({"v_bits": 4}, {"v_axis": "channel", "v_group_size": 48})
    assert e.path == "layers[5].v_group_size" and "power of two" in str(e)
    e = err({"k_bits": 2, "k_axis": "channel", "k_group_size": 256})
    assert e.path == "defaults.k_group_size" and "<= 128" in str(e)
    # A 16-bit store has no groups, so its group size is not checked; channel groups need not divide head_dim.
    mf.Manifest.from_json(
        base_obj(smollm2, defaults={"k_group_size": 48, "v_bits": 2, "v_axis": "channel", "v_group_size": 128})
    )


def test_check_model(smollm2):
    m = mf.uniform(smollm2, 4, 4)
    m.check_model("SmolLM2-135M-Instruct", 30, 3, 64)
    m.check_model("HuggingFaceTB/smollm2-135m-instruct", 30, 3, 64)  # org prefix and case ignored
    m.check_model(num_layers=30)
    with pytest.raises(ManifestError) as e:
        m.check_model(num_layers=32)
    assert str(e.value) == "model.num_layers: manifest has 30, model has 32"
    for kw, path in (({"num_kv_heads": 8}, "model.num_kv_heads"), ({"head_dim": 128}, "model.head_dim")):
        with pytest.raises(ManifestError) as e:
            m.check_model(**kw)
        assert e.value.path == path
    with pytest.raises(ManifestError) as e:
        m.check_model("SmolLM2-360M-Instruct", 30, 3, 64)
    assert e.value.path == "model.name"
    star = mf.uniform(ModelIdentity("*", 30, 3, 64), 4, 4)
    star.check_model("anything", 30, 3, 64)
    with pytest.raises(ManifestError):
        star.check_model("anything", 31, 3, 64)  # "*" matches names, never shapes


def test_register_mode_name(smollm2, monkeypatch):
    monkeypatch.setattr(mf, "_MODE_NAMES", {"int"})  # keep the global registry clean for other tests
    obj = base_obj(smollm2, defaults={"k_bits": 8, "k_mode": "fp8"})
    assert error_of(obj).path == "defaults.k_mode"
    mf.register_mode_name("fp8")
    assert mf.mode_names() == ("fp8", "int")
    assert mf.Manifest.from_json(obj).layer(0).k.mode == "fp8"


def test_uniform_and_mixed(smollm2, tmp_path):
    m = mf.uniform(smollm2, 8, 4, k_axis="channel", k_group_size=32, residual_length=32, k_symmetric=True)
    s = m.layer(29)
    assert s.k == KVSpec(8, "int", "channel", 32, True) and s.v == KVSpec(4, "int", "token", 64, False)
    assert s.residual_length == 32 and not s.rotation
    m.save(tmp_path / "m.json")
    assert (tmp_path / "m.json").read_text() == m.dumps()
    assert mf.load(tmp_path / "m.json") == m and hash(mf.load(tmp_path / "m.json")) == hash(m)
    mx = mf.mixed(smollm2, [(2, 4)] * 29 + [(8, 16)], rotation=True)
    assert mx.layer_bits()[-1] == (8, 16) and mx.layer(0).rotation
    with pytest.raises(ManifestError):
        mf.uniform(smollm2, 3, 4)
    with pytest.raises(ManifestError) as e:
        mf.load(tmp_path / "m.json", model=ModelIdentity("SmolLM2-135M-Instruct", 32, 3, 64))
    assert e.value.path == "model.num_layers" and str(tmp_path / "m.json") in str(e.value)


def test_manifest_is_read_only(smollm2):
    m = mf.uniform(smollm2, 4, 4)
    out = m.to_json()
    out["defaults"]["k_bits"] = 2
    out["layers"][0]["v_bits"] = 2
    assert m.layer(0).k.bits == 4 and m.to_json()["layers"][0] == {}
    with pytest.raises(TypeError):
        m.defaults["k_bits"] = 2


def test_file_errors(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"format": "kvtuner-jax-manifest",')
    with pytest.raises(ManifestError) as e:
        mf.load(p)
    assert str(e.value).startswith(f"{p}: $: not valid JSON")
    with pytest.raises(ManifestError) as e:
        mf.load(tmp_path / "missing.json")
    assert "cannot read" in str(e.value)


# ------------------------------------------------------------------------------------------------ property tests

BITS = st.sampled_from((2, 4, 8, 16))


@st.composite
def valid_manifests(draw):
    """(JSON object, model) with random defaults and per-layer overrides; every group size is a power of two <=
    head_dim, which is valid for either axis."""
    head_dim = draw(st.sampled_from((32, 64, 128)))
    model = ModelIdentity(
        draw(st.sampled_from(("m", "*", "org/Model-7B"))), draw(st.integers(1, 6)), draw(st.integers(1, 4)), head_dim
    )
    groups = [g for g in (1, 2, 4, 8, 16, 32, 64, 128) if g <= head_dim]
    values = {
        "k_bits": BITS,
        "v_bits": BITS,
        "k_mode": st.just("int"),
        "v_mode": st.just("int"),
        "k_symmetric": st.booleans(),
        "v_symmetric": st.booleans(),
        "k_axis": st.sampled_from(("token", "channel")),
        "v_axis": st.sampled_from(("token", "channel")),
        "k_group_size": st.sampled_from(groups),
        "v_group_size": st.sampled_from(groups),
        "residual_length": st.integers(0, 256),
        "rotation": st.booleans(),
        "scale_dtype": st.sampled_from(("float16", "bfloat16")),
    }

    def entry():
        keys = draw(st.lists(st.sampled_from(mf.LAYER_KEYS), unique=True, max_size=5))
        return {k: draw(values[k]) for k in keys}

    obj = {"format": mf.FORMAT, "version": 1, "model": dict(model.__dict__)}
    if draw(st.booleans()):
        obj["defaults"] = entry()
    obj["layers"] = [entry() for _ in range(model.num_layers)]
    if draw(st.booleans()):
        obj["metadata"] = {"source": draw(st.text(max_size=10)), "nested": {"x": [1, 2.5, None, True]}}
    return obj


def resolve_independently(obj: dict, i: int, key: str):
    for src in (obj["layers"][i], obj.get("defaults", {})):
        if key in src:
            return src[key]
    return {"k_group_size": obj["model"]["head_dim"], "v_group_size": obj["model"]["head_dim"]}.get(
        key, mf.BUILTIN_DEFAULTS[key]
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_manifests())
def test_valid_manifests_round_trip(obj):
    m = mf.Manifest.from_json(copy.deepcopy(obj))
    assert m.to_json() == obj
    text = m.dumps()
    assert json.loads(text) == obj
    again = mf.Manifest.from_json(json.loads(text))
    assert again == m and again.dumps() == text
    for i, s in enumerate(m.layer_specs()):
        for p, kv in (("k", s.k), ("v", s.v)):
            got = (kv.bits, kv.mode, kv.axis, kv.group_size, kv.symmetric, kv.scale_dtype)
            want = tuple(
                resolve_independently(obj, i, f"{p}_{f}") for f in ("bits", "mode", "axis", "group_size", "symmetric")
            )
            assert got == (*want, resolve_independently(obj, i, "scale_dtype"))
        assert s.residual_length == resolve_independently(obj, i, "residual_length")
        assert s.rotation == resolve_independently(obj, i, "rotation")


MUTATIONS = ("wrong_type", "missing_layer", "bits_range", "group_not_dividing", "layer_count", "unknown_field")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_manifests(), st.sampled_from(MUTATIONS), st.data())
def test_mutated_manifests_raise_with_path(obj, kind, data):
    n = obj["model"]["num_layers"]
    i = data.draw(st.integers(0, n - 1))
    layer = obj["layers"][i]
    if kind == "wrong_type":
        key, bad = data.draw(
            st.sampled_from(
                [
                    ("k_bits", "8"),
                    ("v_bits", 4.0),
                    ("k_symmetric", 0),
                    ("rotation", "yes"),
                    ("k_axis", 1),
                    ("v_group_size", 32.0),
                    ("residual_length", None),
                    ("scale_dtype", 16),
                    ("k_mode", ["int"]),
                ]
            )
        )
        layer[key] = bad
        path = f"layers[{i}].{key}"
    elif kind == "missing_layer":
        if data.draw(st.booleans()):
            del obj["layers"][i]
            path = "layers"
        else:  # object form with one layer missing
            obj["layers"] = {mf.module_name(j): e for j, e in enumerate(obj["layers"]) if j != i}
            path = "layers"
    elif kind == "bits_range":
        key = data.draw(st.sampled_from(("k_bits", "v_bits")))
        layer[key] = data.draw(st.sampled_from((0, 1, 3, 5, 6, 7, 12, 32, -4)))
        path = f"layers[{i}].{key}"
    elif kind == "group_not_dividing":
        p = data.draw(st.sampled_from(("k", "v")))
        layer.update({f"{p}_bits": data.draw(st.sampled_from((2, 4, 8))), f"{p}_axis": "token"})
        layer[f"{p}_group_size"] = data.draw(st.sampled_from((3, 5, 6, 7, 12, 24, 48, 96, 129, 256)))
        path = f"layers[{i}].{p}_group_size"
    elif kind == "layer_count":
        obj["model"]["num_layers"] = n + data.draw(st.sampled_from((1, 2, -1))) if n > 1 else n + 1
        path = "layers"
    else:
        layer[data.draw(st.sampled_from(("kbits", "k_bits ", "group_size", "bits")))] = 4
        path = f"layers[{i}]."
    with pytest.raises(ManifestError) as e:
        mf.Manifest.from_json(obj)
    assert e.value.path.startswith(path), (kind, str(e.value))
    assert str(e.value).startswith(e.value.path + ": ")


# ------------------------------------------------------------------------------------------------ KVTuner YAML


def yaml_bits(path: Path) -> list[tuple[int, int]]:
    d = yaml.safe_load(path.read_text())
    return [(d[i]["nbits_key"], d[i]["nbits_value"]) for i in range(len(d))]


def test_upstream_presets_average_bits():
    assert b"\r\n" in LLAMA_YAML.read_bytes() and b"\r\n" in QWEN_YAML.read_bytes()  # CRLF as upstream ships them
    llama = mf.load(LLAMA_YAML)
    assert llama.model == LLAMA31 and llama.layer_bits() == tuple(yaml_bits(LLAMA_YAML))
    assert mf.memory_report(llama).avg_nominal_bits == 3.25
    s = llama.layer(0)  # "kivi": keys per-channel G32, values per-token G32, residual 32
    assert (s.k.axis, s.k.group_size, s.v.axis, s.v.group_size, s.residual_length) == ("channel", 32, "token", 32, 32)
    qwen = mf.load(QWEN_YAML)
    assert qwen.model == QWEN25 and qwen.layer_bits() == tuple(yaml_bits(QWEN_YAML))
    assert mf.memory_report(qwen).avg_nominal_bits == 4.0
    s = qwen.layer(0)  # "pertoken": per-token groups of head_dim, no residual
    assert (s.k.axis, s.k.group_size, s.v.axis, s.v.group_size, s.residual_length) == ("token", 128, "token", 128, 0)
    assert qwen.metadata["source"] == QWEN_YAML.name and qwen.metadata["scheme"] == "pertoken"


def test_yaml_text_input_crlf_and_errors():
    text = "0:\r\n  nbits_key: 8\r\n  nbits_value: 4\r\n1:\r\n  nbits_key: 2\r\n  nbits_value: 16\r\n"
    model = ModelIdentity("tiny", 2, 1, 64)
    m = mf.from_kvtuner_yaml(text, model, scheme="pertoken")
    assert m.layer_bits() == ((8, 4), (2, 16))
    with pytest.raises(ManifestError, match="scheme"):
        mf.from_kvtuner_yaml(text, model)
    with pytest.raises(ManifestError, match="pass model="):
        mf.from_kvtuner_yaml(text, None, scheme="kivi")
    with pytest.raises(ManifestError) as e:
        mf.from_kvtuner_yaml(text.replace("nbits_key: 2", "nbits_key: 3"), model, scheme="kivi")
    assert e.value.path == "1.nbits_key" and "3 is not one of 2, 4, 8, 16" in str(e.value)
    with pytest.raises(ManifestError) as e:
        mf.from_kvtuner_yaml(text, ModelIdentity("tiny", 3, 1, 64), scheme="kivi")
    assert e.value.path == "layers"
    with pytest.raises(ManifestError) as e:
        mf.from_kvtuner_yaml(text.replace("nbits_value: 4", "nbits_value: 4\r\n  group: 2"), model, scheme="kivi")
    assert e.value.path == "0.group"


def test_per_head_yaml_reduces_by_max_over_heads():
    with pytest.raises(ManifestError, match="scheme"):  # the file name names no scheme
        mf.load(PER_HEAD_YAML)
    m = mf.load(PER_HEAD_YAML, scheme="kivi")
    assert m.model.name == "Meta-Llama-3-8B-Instruct" and m.layer_bits() == ((8, 4),) * 32
    assert m.metadata["per_head_reduction"] == mf.PER_HEAD_RULE
    # Heads that disagree: K takes the max over heads, V separately.
    text = (
        "0:\n  0: {nbits_key: 2, nbits_value: 8}\n  1: {nbits_key: 4, nbits_value: 2}\n"
        "1:\n  0: {nbits_key: 2, nbits_value: 2}\n  1: {nbits_key: 2, nbits_value: 4}\n"
    )
    m = mf.from_kvtuner_yaml(text, ModelIdentity("tiny", 2, 2, 64), scheme="pertoken")
    assert m.layer_bits() == ((4, 8), (2, 4))
    with pytest.raises(ManifestError) as e:  # per-head presets must have the model's KV head count
        mf.from_kvtuner_yaml(text, ModelIdentity("tiny", 2, 4, 64), scheme="pertoken")
    assert e.value.path == "model.num_kv_heads"


# ------------------------------------------------------------------------------------------------ memory arithmetic


def test_memory_hand_computed(smollm2):
    # SmolLM2 4/4, per-token groups of 64, asymmetric fp16 scale + zero: per layer and token, K is 3 heads * 64 * 4/8
    # = 96 code bytes + 3 groups * 2 params * 2 bytes = 12 -> 108; K+V over 30 layers = 6480; bf16 = 23040.
    r = mf.memory_report(mf.uniform(smollm2, 4, 4))
    assert r.layers[0].k_bytes_per_token == 108 and r.layers[0].v_bytes_per_token == 108
    assert r.bytes_per_token == 6480 and r.bf16_bytes_per_token == 23040
    assert r.avg_nominal_bits == 4 and r.effective_bits == 4.5 and r.ratio_vs_bf16 == 6480 / 23040
    # KIVI 2-bit: K per-channel G32: 48 code bytes + 192 channels * 2 params * 2 B / 32 tokens = 24 -> 72; V the same.
    k = mf.memory_report(mf.load(CONFIGS / "kivi_k2v2.json"))
    assert k.layers[0].k_bytes_per_token == 72 and k.layers[0].v_bytes_per_token == 72
    assert k.effective_bits == 3.0
    # Symmetric stores one parameter per group; bits 16 cost the cache dtype.
    s = mf.memory_report(mf.uniform(smollm2, 8, 16, k_symmetric=True, k_group_size=32))
    assert s.layers[0].k_bytes_per_token == 192 + 6 * 2 and s.layers[0].v_bytes_per_token == 384
    assert mf.memory_report(mf.uniform(smollm2, 16, 16)).ratio_vs_bf16 == 1.0


def all_configs() -> list[Path]:
    return sorted(CONFIGS.glob("*.json"))


@pytest.mark.parametrize("page_size", (32, 64, 128))
def test_bytes_agree_with_pool_layout(page_size):
    from pallas_kernels import layout

    for path in all_configs():
        m = mf.load(path)
        r = mf.memory_report(m, page_size=page_size)
        h, d = m.model.num_kv_heads, m.model.head_dim
        for lm in r.layers:
            k = layout.bytes_per_page(lm.spec.k, h, page_size, d)
            v = layout.bytes_per_page(lm.spec.v, h, page_size, d)
            assert lm.k_bytes_per_token * page_size == k and lm.v_bytes_per_token * page_size == v, path.name
            assert lm.page_bytes == k + v
        assert r.page_bytes == sum(lm.page_bytes for lm in r.layers)


def simulate_quantized_tokens(n: int, residual: int, page_size: int) -> int:
    """Decode one token at a time: append to the tail, then move whole pages out while the tail holds R + P."""
    tail = quantized = 0
    for _ in range(n):
        tail += 1
        while tail >= residual + page_size:
            tail -= page_size
            quantized += page_size
    return quantized


@pytest.mark.parametrize("page_size", (32, 64))
def test_kv_bytes_counts_the_residual_tail(page_size):
    m = mf.load(CONFIGS / "llama31_8b_kvtuner_3.25bit.json")  # residual 32, mixed bits
    r = mf.memory_report(m, page_size=page_size)
    full = 2 * 8 * 128 * 2  # K+V of one token of one layer in bf16
    for n in (0, 1, 31, 32, 47, 48, 63, 64, 65, 100, 1000):
        want = 0
        for lm in r.layers:
            q = simulate_quantized_tokens(n, lm.spec.residual_length, page_size)
            want += q * (lm.k_bytes_per_token + lm.v_bytes_per_token) + (n - q) * full
        assert r.kv_bytes(n) == want, n
    assert r.kv_bytes(0) == 0 and r.kv_bytes(10) == 10 * r.bf16_bytes_per_token  # all in the tail
    big = 1 << 20
    assert abs(r.kv_bytes(big) / big - float(r.bytes_per_token)) < 1e-3 * float(r.bytes_per_token)
    asym = mf.memory_report(m)
    assert asym.kv_bytes(1000) == math.ceil(1000 * asym.bytes_per_token)
    with pytest.raises(ValueError):
        r.kv_bytes(-1)


def test_page_size_must_fit_channel_groups(smollm2):
    m = mf.load(CONFIGS / "kivi_k2v2.json")
    with pytest.raises(ManifestError) as e:
        mf.memory_report(m, page_size=16)
    assert e.value.path == "layers[0].k_group_size" and "page_size 16" in str(e.value)


# ------------------------------------------------------------------------------------------------ configs and CLI


def test_configs_are_current_and_valid():
    sys.path.insert(0, str(CONFIGS))
    try:
        import make_configs
    finally:
        sys.path.remove(str(CONFIGS))
    built = make_configs.build()
    assert sorted(built) == [p.name for p in all_configs()]
    for name, m in built.items():
        assert (CONFIGS / name).read_text() == m.dumps(), f"{name} is stale: run python configs/make_configs.py"
    smol = {n: mf.load(CONFIGS / n) for n in built if n.startswith(("smollm2", "kivi"))}
    for m in smol.values():
        m.check_model("SmolLM2-135M-Instruct", 30, 3, 64)
    assert smol["smollm2_k8v4.json"].layer_bits() == ((8, 4),) * 30
    kivi = smol["kivi_k4v4.json"].layer(0)
    assert kivi == LayerSpec(KVSpec(4, "int", "channel", 32), KVSpec(4, "int", "token", 32), residual_length=32)
    llama = mf.load(CONFIGS / "llama31_8b_kvtuner_3.25bit.json")
    assert llama.layer_specs() == mf.load(LLAMA_YAML).layer_specs() and llama.metadata["source"] == LLAMA_YAML.name
    assert mf.memory_report(llama).avg_nominal_bits == 3.25
    qwen = mf.load(CONFIGS / "qwen25_7b_kvtuner_4.0bit.json")
    assert qwen.layer_specs() == mf.load(QWEN_YAML).layer_specs() and qwen.metadata["source"] == QWEN_YAML.name
    assert mf.memory_report(qwen).avg_nominal_bits == 4.0


def test_describe_cli(capsys, tmp_path):
    assert (
        mf.main(["describe", str(CONFIGS / "llama31_8b_kvtuner_3.25bit.json"), "--tokens", "1000", "--page_size", "32"])
        == 0
    )
    out = capsys.readouterr().out
    assert "average nominal bits: 3.25" in out and "effective bits (incl. scales/zeros): 4.25" in out
    r = mf.memory_report(mf.load(CONFIGS / "llama31_8b_kvtuner_3.25bit.json"), page_size=32)
    assert f"KV bytes for 1000 tokens (page_size 32, residual tails exact): {r.kv_bytes(1000)}" in out
    bad = tmp_path / "bad.json"
    obj = json.loads((CONFIGS / "smollm2_k4v4.json").read_text())
    obj["layers"][7]["k_bits"] = 3
    bad.write_text(json.dumps(obj))
    assert mf.main(["describe", str(bad)]) == 2
    assert f"{bad}: layers[7].k_bits: 3 is not one of 2, 4, 8, 16" in capsys.readouterr().err


def test_describe_as_module(tmp_path):
    cmd = [sys.executable, "-m", "kvtuner_jax.manifest", "describe", str(QWEN_YAML)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Qwen2.5-7B-Instruct" in res.stdout and "average nominal bits: 4" in res.stdout
    res = subprocess.run(cmd[:-1] + [str(tmp_path / "none.json")], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "cannot read" in res.stderr
