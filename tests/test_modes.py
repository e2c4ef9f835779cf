"""Storage modes (kvtuner_jax.modes): the registry, the fp8 mode against an independent numpy/ml_dtypes oracle, and a
toy mode defined here that runs manifest -> cache -> write -> attention -> memory arithmetic with no core change.

Oracles: fp8 codes and scales are compared bit for bit with numpy + ml_dtypes (the cast to float8_e4m3fn there is
round-to-nearest-even, as XLA's); attention is compared with float64 numpy over the dequantized pages; the cache is
compared with a step-by-step float64 simulation of DESIGN.md's residual window; the model with an fp8 manifest is
compared with the decode-faithful pass.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _lowering import abstract_mesh

from kvtuner_jax import cache as kc
from kvtuner_jax import faithful, model, modes
from kvtuner_jax import manifest as mf
from kvtuner_jax.page_table import PageAllocator, SequencePages, pages_needed, table_rows
from kvtuner_jax.specs import KVSpec, ModelIdentity
from pallas_kernels import layout
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference
from pallas_kernels.quantize_write import dequantize_pages, quantize_pages, quantize_write, quantize_write_reference

FP8 = KVSpec(bits=8, mode="fp8", axis="token", group_size=32, symmetric=True)
NP_SCALE = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def np_fp8(x: np.ndarray, scale_dtype: str = "float16"):
    """Independent fp8 oracle: x [..., D] -> (codes as uint8 bit patterns, scale [..., 1], x_hat float64)."""
    x = np.where(np.isfinite(x), x, 0).astype(np.float32)
    sdt = NP_SCALE[scale_dtype]
    amax = np.abs(x).max(-1, keepdims=True)
    fmax = np.float32(np.finfo(np.float16).max if scale_dtype == "float16" else ml_dtypes.finfo(sdt).max)
    scale = np.minimum(np.maximum(amax, np.float32(1e-4)) / np.float32(448), fmax).astype(sdt)
    y = np.clip(x / scale.astype(np.float32), -448, 448)
    codes = y.astype(ml_dtypes.float8_e4m3fn)
    x_hat = codes.astype(np.float64) * scale.astype(np.float64)
    return codes.view(np.uint8), scale, x_hat


def _pages(rng, shape, outliers=True):
    x = rng.normal(size=shape).astype(np.float32)
    if outliers:  # a few large channels and one all-zero token, as real keys have
        x[..., 3] *= 40.0
        x[0, 0, 0] = 0.0
    return x


# ---------------------------------------------------------------------------------------------------------------------
# Registry


def test_registry_names_and_lazy_import():
    """The shipped modes are registered by name; manifest validation and byte counts import no jax and no mode that
    is not used (fp8's module stays unimported for an int manifest)."""
    assert {"int", "bf16", "fp8"} <= set(modes.registered_modes())
    with pytest.raises(ValueError, match="not registered"):
        modes.get_mode("nope")
    code = (
        "import sys, json\n"
        "from kvtuner_jax import manifest as mf\n"
        "m = mf.uniform(mf.KNOWN_MODELS[0], 4, 2)\n"
        "r = mf.memory_report(m, page_size=32)\n"
        "a = ('jax' in sys.modules, 'pallas_kernels.modes.fp8' in sys.modules, r.page_bytes)\n"
        "d = {**m.to_json()['defaults'], 'k_mode': 'fp8'}\n"
        "del d['k_bits']  # bits given beside a mode must fit it; omitted, fp8 implies 8\n"
        "m8 = mf.Manifest.from_json({**m.to_json(), 'defaults': d})\n"
        "r8 = mf.memory_report(m8, page_size=32)\n"
        "print(json.dumps([*a, 'jax' in sys.modules, 'pallas_kernels.modes.fp8' in sys.modules, r8.page_bytes]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    jax_int, fp8_int, _, jax_fp8, fp8_fp8, page8 = json.loads(out)
    assert (jax_int, fp8_int, jax_fp8, fp8_fp8) == (False, False, False, True)
    # SmolLM2 (30 layers, 3 heads, D 64), page 32: K fp8 = 32 * (192 + 3 * 2); V int2 asym G64 = 32 * (48 + 3 * 2 * 2)
    assert page8 == 30 * 32 * ((192 + 6) + (48 + 12))


def test_mode_of_spec():
    assert modes.mode_name_of(KVSpec(16)) == "bf16"
    assert modes.mode_name_of(KVSpec(16, mode="fp8")) == "bf16"  # 16 bits always means unquantized
    assert modes.mode_name_of(KVSpec(4)) == "int"
    assert modes.mode_of(FP8).name == "fp8"
    with pytest.raises(ValueError, match="fp8"):
        layout.check_spec(dataclasses.replace(FP8, bits=4), 16, 32)


# ---------------------------------------------------------------------------------------------------------------------
# fp8


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_fp8_quantize_matches_numpy(rng, scale_dtype):
    spec = dataclasses.replace(FP8, scale_dtype=scale_dtype)
    x = _pages(rng, (2, 3, 16, 32))  # [H, M, P, D]
    x[1, 2, 5, :4] = [np.nan, np.inf, -np.inf, 1.0]  # non-finite -> 0, the rest of the token unaffected
    codes, scale, zero = quantize_pages(jnp.asarray(x), spec)
    assert zero is None and codes.dtype == jnp.float8_e4m3fn and scale.shape == (2, 3, 16, 1)
    want_codes, want_scale, want_hat = np_fp8(x, scale_dtype)
    np.testing.assert_array_equal(np.asarray(codes).view(np.uint8), want_codes)  # bit for bit
    np.testing.assert_array_equal(np.asarray(scale), want_scale)
    got = np.asarray(dequantize_pages(codes, scale, zero, spec), np.float64)
    np.testing.assert_allclose(got, want_hat, rtol=1e-6)  # one f32 product vs f64
    # e4m3 keeps 3 mantissa bits: |x - x_hat| <= 2^-4 |x| for normal codes, <= scale * 2^-10 near zero (subnormals)
    xf = np.where(np.isfinite(x), x, 0)
    bound = np.maximum(np.abs(xf) * 2.0**-4, want_scale.astype(np.float64) * 2.0**-10) * 1.01
    assert np.all(np.abs(got - xf) <= bound)


def test_fp8_hand_case():
    """One token by hand: amax 448 -> scale 1 exactly; 1.0625 ties between 1.0 and 1.125 -> even mantissa 1.0;
    3.3 -> 3.25 (nearest e4m3 value: 3.25 and 3.5 are the neighbours)."""
    x = jnp.asarray([[[[448.0, 1.0625, 3.3, -0.5]]]])
    codes, scale, _ = quantize_pages(x, dataclasses.replace(FP8, group_size=4))
    assert float(scale[0, 0, 0, 0]) == 1.0
    np.testing.assert_array_equal(np.asarray(codes.astype(jnp.float32))[0, 0, 0], [448.0, 1.0, 3.25, -0.5])


def test_fp8_layout_bytes_agree(smollm2):
    h, d, p = smollm2.num_kv_heads, smollm2.head_dim, 32
    codes, scale, zero = layout.allocate(FP8, h, 5, p, d)
    assert codes.shape == (h, 5, p, d) and codes.dtype == jnp.float8_e4m3fn
    assert scale.shape == (h, 5, p, 1) and scale.dtype == jnp.float16 and zero is None
    per_page = (codes.nbytes + scale.nbytes) // 5
    assert layout.bytes_per_page(FP8, h, p, d) == per_page == p * (h * d + h * 2)
    assert FP8.bytes_per_token(h, d) == h * d + 2 * h


def test_fp8_write_reference_poisoned_pool(rng):
    h, n, p, d, m = 2, 6, 16, 32, 3
    codes = jnp.asarray(rng.integers(0, 256, (h, n, p, d), dtype=np.uint8)).view(jnp.float8_e4m3fn)
    scale = jnp.asarray(rng.uniform(1, 2, (h, n, p, 1)).astype(np.float16))
    x = _pages(rng, (h, m, p, d))
    dest = jnp.asarray([4, -1, 1], jnp.int32)  # page 1 of the batch flushes nothing
    c2, s2, z2 = quantize_write_reference(codes, scale, None, jnp.asarray(x), dest, spec=FP8)
    assert z2 is None
    want_c = np.asarray(codes).view(np.uint8).copy()
    want_s = np.asarray(scale).copy()
    qc, qs, _ = np_fp8(x)
    for i, dst in enumerate([4, -1, 1]):
        if dst >= 0:
            want_c[:, dst], want_s[:, dst] = qc[:, i], qs[:, i]
    np.testing.assert_array_equal(np.asarray(c2).view(np.uint8), want_c)
    np.testing.assert_array_equal(np.asarray(s2), want_s)


def np_attention(q, k, v, num_tokens):
    """float64: q [B, Hq, T, D], k/v [B, H, S, D] -> out, lse over the first num_tokens[b] keys."""
    b, hq, t, d = q.shape
    g = hq // k.shape[1]
    out, lse = np.zeros((b, hq, t, d)), np.full((b, hq, t), -np.inf)
    for bi in range(b):
        n = num_tokens[bi]
        if n == 0:
            continue
        for i in range(hq):
            s = q[bi, i].astype(np.float64) @ k[bi, i // g, :n].T / np.sqrt(d)  # [T, n]
            mx = s.max(-1, keepdims=True)
            e = np.exp(s - mx)
            out[bi, i] = (e / e.sum(-1, keepdims=True)) @ v[bi, i // g, :n]
            lse[bi, i] = mx[:, 0] + np.log(e.sum(-1))
    return out, lse


def test_fp8_attention_reference_vs_numpy(rng):
    """K fp8 with V int4 (modes mix freely per store): reference attention equals float64 numpy over the numpy-
    dequantized pages."""
    h, hq, n, p, d, b = 2, 4, 8, 16, 32, 3
    v_spec = KVSpec(bits=4, group_size=16)
    xk, xv = _pages(rng, (h, n, p, d)), rng.normal(size=(h, n, p, d)).astype(np.float32)
    kc_, ks, kz = quantize_pages(jnp.asarray(xk), FP8)
    vc, vs, vz = quantize_pages(jnp.asarray(xv), v_spec)
    table = np.array([[3, 0, 5, 7], [6, 2, -1, -1], [1, -1, -1, -1]], np.int32)
    num_tokens = np.array([4 * p, 2 * p, 0], np.int32)
    q = rng.normal(size=(b, hq, 2, d)).astype(np.float32)
    ref = jax.jit(functools.partial(paged_attention_reference, k_spec=FP8, v_spec=v_spec, sm_scale=1 / np.sqrt(d)))
    out, lse = ref(jnp.asarray(q), kc_, ks, kz, vc, vs, vz, jnp.asarray(table), jnp.asarray(num_tokens))
    k_hat = np_fp8(xk)[2]
    v_hat = np.asarray(dequantize_pages(vc, vs, vz, v_spec), np.float64)  # int4 numerics are test_quant's subject
    tk = np.clip(table, 0, n - 1)
    kk = k_hat[:, tk].reshape(h, b, -1, d).transpose(1, 0, 2, 3)
    vv = v_hat[:, tk].reshape(h, b, -1, d).transpose(1, 0, 2, 3)
    want, want_lse = np_attention(q, kk, vv, num_tokens)
    # f32 softmax over <= 64 keys vs f64: relative error ~1e-6; 1e-5 leaves margin, far below fp8's ~3% steps
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_fp8_write_kernels_match_reference(backend, rng, caplog):
    """backend="gpu"/"tpu": the dispatcher runs fp8's own Pallas write kernels (interpret mode), not the fallback;
    on a poisoned pool with a skipped page their bytes equal the reference's (the tile math is the same jnp)."""
    h, n, p, d = 2, 5, 16, 32
    codes = jnp.asarray(rng.integers(0, 256, (h, n, p, d), dtype=np.uint8)).view(jnp.float8_e4m3fn)
    scale = jnp.asarray(rng.uniform(1, 2, (h, n, p, 1)).astype(np.float16))
    x = _pages(rng, (h, 3, p, d))
    x[1, 2, 5, :3] = [np.nan, np.inf, -1e30]  # non-finite -> 0; a huge finite value saturates the scale's range
    dest = jnp.asarray([3, -1, 0], jnp.int32)
    want = quantize_write_reference(codes, scale, None, jnp.asarray(x), dest, spec=FP8)
    with caplog.at_level(logging.WARNING, logger="kvtuner_jax.modes"):
        got = quantize_write(codes, scale, None, jnp.asarray(x), dest, spec=FP8, backend=backend, interpret=True)
    assert not [r for r in caplog.records if "write" in r.getMessage()]  # the kernel ran, not the reference
    np.testing.assert_array_equal(np.asarray(got[0]).view(np.uint8), np.asarray(want[0]).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    assert got[2] is None


@pytest.mark.parametrize(
    "backend,pair", [("gpu", "fp8/fp8"), ("gpu", "fp8/bf16"), ("tpu", "fp8/fp8"), ("tpu", "bf16/fp8")]
)
def test_fp8_attention_kernels_match_reference(backend, pair, rng, caplog):
    """fp8's GPU and TPU attention kernels (interpret mode), reached through the dispatcher: GQA 3:1 with 2 query
    tokens, a table with INVALID entries past the end, an empty sequence (out 0, lse -inf), against the reference."""
    h, hq, n, p, d, b = 2, 6, 7, 16, 32, 3
    ks, vs = (FP8 if m == "fp8" else KVSpec(16) for m in pair.split("/"))
    xk, xv = _pages(rng, (h, n, p, d)), rng.normal(size=(h, n, p, d)).astype(np.float32)
    k = quantize_pages(jnp.asarray(xk), ks)
    v = quantize_pages(jnp.asarray(xv), vs)
    table = jnp.asarray([[3, 0, 5, 6], [6, 2, -1, -1], [1, -1, -1, -1]], jnp.int32)
    args = (jnp.asarray(rng.normal(size=(b, hq, 2, d)).astype(np.float32)), *k, *v, table, jnp.asarray([64, 32, 0]))
    with caplog.at_level(logging.WARNING, logger="kvtuner_jax.modes"):
        out, lse = paged_attention(*args, k_spec=ks, v_spec=vs, sm_scale=0.3, backend=backend, interpret=True)
    assert not caplog.records  # the kernel ran, not the fallback
    want, want_lse = paged_attention_reference(*args, k_spec=ks, v_spec=vs, sm_scale=0.3)
    # Both f32, but the kernel scales q before the dot and uses exp2: with outlier channels scores reach |s| ~ 50,
    # and a few f32 roundings of s (|s| * 2^-23 each) move a softmax weight by ~1e-5 relative; fp8 steps are ~3%.
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=1e-4, rtol=1e-4)
    assert np.all(np.asarray(lse)[2] == -np.inf) and np.all(np.asarray(out)[2] == 0)


def test_fp8_attention_kernels_lower():
    """The compiled fp8 attention kernels lower: Triton for an abstract H100, Mosaic for TPU (jax.export)."""
    from pallas_kernels.modes import fp8_kernels

    spec = dataclasses.replace(FP8, group_size=128)
    k = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in layout.allocate(spec, 8, 64, 16, 128)[:2]]
    f = lambda q, kc, ks, vc, vs, pt, nt: fp8_kernels.paged_attention_gpu(
        q, kc, ks, None, vc, vs, None, pt, nt, k_spec=spec, v_spec=spec, sm_scale=0.1
    )
    args = (jax.ShapeDtypeStruct((4, 32, 1, 128), jnp.bfloat16), *k, *k)
    args += (jax.ShapeDtypeStruct((4, 16), jnp.int32), jax.ShapeDtypeStruct((4,), jnp.int32))
    with jax.sharding.use_abstract_mesh(abstract_mesh("NVIDIA H100", "gpu")):
        assert "triton" in jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    for ps, v_spec in ((16, spec), (128, KVSpec(16))):
        kk = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in layout.allocate(spec, 8, 32, ps, 128)[:2]]
        vv = kk if v_spec is spec else [jax.ShapeDtypeStruct(kk[0].shape, jnp.bfloat16), None]
        t = lambda q, kc, ks, vc, vs, pt, nt, v_spec=v_spec: fp8_kernels.paged_attention_tpu(
            q, kc, ks, None, vc, vs, None, pt, nt, k_spec=spec, v_spec=v_spec, sm_scale=0.1
        )
        a = (args[0], *kk, *vv, args[-2], args[-1])
        with jax.sharding.use_abstract_mesh(abstract_mesh("TPU v5 lite", "tpu")):
            assert "tpu_custom_call" in jax.export.export(jax.jit(t), platforms=["tpu"])(*a).mlir_module()


@pytest.mark.parametrize("page_size", [16, 128])
def test_fp8_write_kernels_lower_in_place(page_size):
    """Compiled fp8 writes lower for TPU (Mosaic, via jax.export) and for an abstract H100 (Triton), and under a
    donating jit every pool array is aliased to an output with no copy of the pool."""
    from pallas_kernels.modes import fp8_kernels

    pool = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in layout.allocate(FP8, 2, 4, page_size, 64)[:2]]
    args = (*pool, jax.ShapeDtypeStruct((2, 3, page_size, 64), jnp.bfloat16), jax.ShapeDtypeStruct((3,), jnp.int32))
    spec = dataclasses.replace(FP8, group_size=64)
    tpu = lambda c, s, pg, d: fp8_kernels.quantize_write_tpu(c, s, None, pg, d, spec=spec)[:2]
    with jax.sharding.use_abstract_mesh(abstract_mesh("TPU v5 lite", "tpu")):
        assert "tpu_custom_call" in jax.export.export(jax.jit(tpu), platforms=["tpu"])(*args).mlir_module()
    gpu = lambda c, s, pg, d: fp8_kernels.quantize_write_gpu(c, s, None, pg, d, spec=spec)[:2]
    with jax.sharding.use_abstract_mesh(abstract_mesh("NVIDIA H100", "gpu")):
        lowered = jax.jit(gpu, donate_argnums=(0, 1)).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "triton" in text and "stablehlo.copy" not in text
    assert sorted(re.findall(r"tf\.aliasing_output = (\d+)", text)) == ["0", "1"]


# ---------------------------------------------------------------------------------------------------------------------
# Model with an fp8 manifest

TINY = dataclasses.replace(model.tiny_config(), num_layers=2)
PAGE = 8


def test_model_runs_with_fp8_manifest():
    """An fp8 manifest (K fp8 everywhere, V fp8 on layer 1, V int4 on layer 0) drives the paged cache: decode steps
    equal the decode-faithful pass, and fp8 stays close to the unquantized model."""
    from kvtuner_jax.runtime import ModelRunner, make_batch

    ident = ModelIdentity("tiny", TINY.num_layers, TINY.num_kv_heads, TINY.head_dim)
    man = mf.Manifest.from_json(
        {
            "format": mf.FORMAT,
            "version": 1,
            "model": dataclasses.asdict(ident),
            "defaults": {"k_mode": "fp8", "v_bits": 4, "v_group_size": 8, "residual_length": 4},
            "layers": [{}, {"v_mode": "fp8"}],
        }
    )
    assert json.loads(man.dumps()) == man.to_json()  # round trip keeps exactly what was given
    assert mf.Manifest.from_json(json.loads(man.dumps())) == man
    specs = man.layer_specs()
    assert [(s.k.mode, s.k.bits, s.v.mode, s.v.bits) for s in specs] == [("fp8", 8, "int", 4), ("fp8", 8, "fp8", 8)]
    params = model.init_random_params(TINY, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (1, 20), 3, TINY.vocab_size))
    cc = kc.CacheConfig(TINY.num_layers, TINY.num_kv_heads, TINY.head_dim, PAGE, 16, 1, dtype="float32")
    runner = ModelRunner(TINY, params, specs, cc, backend="reference")
    cache = runner.init_cache()
    alloc = PageAllocator(cc.num_pages)
    seq = SequencePages(slot=0)
    got = []
    for _ in range(tokens.shape[1]):  # decode token by token: exactly the faithful semantics
        seq.pages += alloc.allocate(runner.pages_for(seq.length + 1) - len(seq.pages))
        logits, cache = runner.step(cache, tokens[:, seq.length : seq.length + 1], make_batch([seq], [1], 8), True)
        got.append(np.asarray(logits)[0, :1])
        seq.length += 1
    got = np.concatenate(got)
    want = np.asarray(faithful.faithful_logits(params, TINY, jnp.asarray(tokens), man, PAGE))[0]
    dense = np.asarray(model.logits_dense(params, TINY, jnp.asarray(tokens)))[0]
    assert np.abs(want - dense).max() > 1e-3  # quantization is visible, so the agreement below means something
    np.testing.assert_allclose(got, want, atol=1e-4)  # f32, two summation orders (as test_model_cache)
    assert np.mean(got.argmax(-1) == dense.argmax(-1)) >= 0.9


# ---------------------------------------------------------------------------------------------------------------------
# A toy mode, defined here, through every core path


class ToyMode(modes.Mode):
    """int8 codes of (x - mean) / scale per token and head, scale = max|x - mean| / 127 and the mean both float32
    [H, N, P, 1]: all three pool arrays used, dtypes no shipped mode uses."""

    name = "toy8"
    valid_bits = (8,)
    implied_bits = 8

    def arrays(self, spec, heads, pages, page_size, head_dim, cache_dtype):
        s = modes.ArraySpec((heads, pages, page_size, 1), "float32")
        return modes.PoolArrays(modes.ArraySpec((heads, pages, page_size, head_dim), "int8"), s, s)

    def quantize_pages(self, pages, spec):
        x = pages.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        scale = jnp.maximum(jnp.max(jnp.abs(x - mean), axis=-1, keepdims=True), 1e-6) / 127
        return jnp.clip(jnp.round((x - mean) / scale), -127, 127).astype(jnp.int8), scale, mean

    def dequantize_pages(self, codes, scale, zero, spec, dtype):
        return (codes.astype(jnp.float32) * scale + zero).astype(dtype)


def np_toy(x: np.ndarray) -> np.ndarray:
    """Independent float64 oracle of ToyMode's round trip (f32 arithmetic as the mode does it)."""
    x = x.astype(np.float32)
    mean = x.mean(-1, keepdims=True, dtype=np.float32)
    scale = np.maximum(np.abs(x - mean).max(-1, keepdims=True), np.float32(1e-6)) / np.float32(127)
    c = np.clip(np.round((x - mean) / scale), -127, 127)
    return c.astype(np.float64) * scale + mean


@pytest.fixture
def toy_mode():
    modes.register_mode("toy8", ToyMode())
    yield modes.get_mode("toy8")
    modes.unregister_mode("toy8")


H, HQ, D, P = 2, 4, 16, 8


def test_toy_mode_end_to_end(toy_mode, rng):
    """manifest (k_mode "toy8") -> memory arithmetic -> cache pools -> page writes -> attention, on the reference
    backend, equal to a float64 step-by-step simulation; no core file knows the mode."""
    ident = ModelIdentity("toy", 1, H, D)
    man = mf.Manifest.from_json(
        {
            "format": mf.FORMAT,
            "version": 1,
            "model": dataclasses.asdict(ident),
            "defaults": {"v_bits": 16, "residual_length": 4},
            "layers": [{"k_mode": "toy8"}],
        }
    )
    (spec,) = man.layer_specs()
    assert (spec.k.mode, spec.k.bits) == ("toy8", 8)
    cfg = kc.CacheConfig(1, H, D, P, 10, 2, dtype="float32")
    cache = kc.init_cache(man.layer_specs(), cfg)
    layer = cache.layers[0]
    assert layer.k.codes.dtype == jnp.int8 and layer.k.zero.shape == (H, 10, P, 1)
    # memory arithmetic: manifest report == cache's page bytes == the arrays actually allocated
    rep = mf.memory_report(man, page_size=P, cache_dtype_bytes=4)
    pool_bytes = sum(a.nbytes for a in jax.tree.leaves((layer.k, layer.v)))
    assert rep.page_bytes == kc.layer_bytes_per_page(spec, cfg) == pool_bytes // cfg.num_pages
    assert rep.layers[0].k_bytes_per_token == H * D + 2 * H * 4
    # poison the K pool: a read of a page nobody wrote would show
    layer = dataclasses.replace(
        layer, k=dataclasses.replace(layer.k, codes=jnp.asarray(rng.integers(-127, 127, layer.k.codes.shape, np.int8)))
    )
    attend = jax.jit(lambda lay, q, k, v, bt: kc.attend(lay, q, k, v, bt, backend="reference"))
    append = jax.jit(lambda lay, k, v, bt: kc.append(lay, k, v, bt, backend="reference"))
    alloc = PageAllocator(cfg.num_pages)
    seqs = [SequencePages(slot=1), SequencePages(slot=0)]
    hist_k = [np.zeros((H, 0, D), np.float32) for _ in seqs]
    hist_v = [np.zeros((H, 0, D), np.float32) for _ in seqs]
    for step in [[19, 6], [1, 1], [1, 0], [5, 1], [1, 1]]:
        t = max(step)
        lengths = np.array([s.length for s in seqs], np.int32)
        for s, n in zip(seqs, step, strict=True):
            s.pages += alloc.allocate(pages_needed(s.length + n, spec.residual_length, P) - len(s.pages))
        q = rng.normal(size=(2, t, HQ, D)).astype(np.float32)
        k = (rng.normal(size=(2, t, H, D)) * np.linspace(0.5, 3, D)).astype(np.float32)
        v = rng.normal(size=(2, t, H, D)).astype(np.float32)
        batch = kc.BatchInfo(
            page_table=jnp.asarray(table_rows(seqs, 6)),
            lengths=jnp.asarray(lengths),
            num_new=jnp.asarray(np.array(step, np.int32)),
            slots=jnp.asarray(np.array([s.slot for s in seqs], np.int32)),
        )
        out = np.asarray(attend(layer, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), batch))
        layer = append(layer, jnp.asarray(k), jnp.asarray(v), batch)
        for b, n in enumerate(step):
            hist_k[b] = np.concatenate([hist_k[b], k[b, :n].transpose(1, 0, 2)], axis=1)
            hist_v[b] = np.concatenate([hist_v[b], v[b, :n].transpose(1, 0, 2)], axis=1)
            nq = max(0, (int(lengths[b]) - spec.residual_length) // P) * P  # quantized before this step
            kq = hist_k[b].astype(np.float64)
            kq[:, :nq] = np_toy(hist_k[b][:, :nq])  # per-token numerics: page boundaries do not matter
            for i in range(n):
                tpos = int(lengths[b]) + i
                ks, vs = kq[:, : tpos + 1], hist_v[b][:, : tpos + 1].astype(np.float64)
                for hh in range(HQ):
                    sc = ks[hh // 2] @ q[b, i, hh] / np.sqrt(D)
                    e = np.exp(sc - sc.max())
                    # f32 cache attention vs f64 over <= 30 keys: ~1e-6 relative; int8 steps are ~1e-2
                    np.testing.assert_allclose(out[b, i, hh], (e / e.sum()) @ vs[hh // 2], atol=2e-5, rtol=1e-4)
            seqs[b].length += n
    got_k, _ = kc.read_sequence(layer, jnp.asarray(table_rows(seqs, 6)[0]), seqs[0].length, seqs[0].slot)
    nq = max(0, (seqs[0].length - spec.residual_length) // P) * P
    assert nq >= 2 * P
    np.testing.assert_allclose(np.asarray(got_k)[:, :nq], np_toy(hist_k[0][:, :nq]), atol=1e-6)


def test_toy_mode_kernel_fallback_warns_once(toy_mode, rng, caplog):
    """backend="gpu"/"tpu" with a mode that has no kernel: the reference runs (same result), one warning per path."""
    spec = KVSpec(bits=8, mode="toy8")
    codes, scale, zero = layout.allocate(spec, H, 4, P, D, jnp.float32)
    x = jnp.asarray(rng.normal(size=(H, 2, P, D)).astype(np.float32))
    dest = jnp.asarray([2, 0], jnp.int32)
    want = quantize_write_reference(codes, scale, zero, x, dest, spec=spec)
    with caplog.at_level(logging.WARNING, logger="kvtuner_jax.modes"):
        for _ in range(2):
            got = quantize_write(codes, scale, zero, x, dest, spec=spec, backend="tpu")
            for a, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(w))
        q = jnp.asarray(rng.normal(size=(1, HQ, 1, D)).astype(np.float32))
        v16 = KVSpec(16)
        vc = jnp.asarray(rng.normal(size=(H, 4, P, D)).astype(np.float32))
        args = (q, *got, vc, None, None, jnp.asarray([[2, 0]], jnp.int32), jnp.asarray([2 * P], jnp.int32))
        for _ in range(2):
            o, lse = paged_attention(*args, k_spec=spec, v_spec=v16, sm_scale=0.25, backend="gpu")
        o_ref, lse_ref = paged_attention_reference(*args, k_spec=spec, v_spec=v16, sm_scale=0.25)
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o_ref))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse_ref))
    msgs = [r.getMessage() for r in caplog.records if "toy8" in r.getMessage()]
    assert len(msgs) == 2 and "write" in msgs[0] and "attention" in msgs[1], msgs


def test_toy_mode_manifest_errors(toy_mode):
    """Bits that contradict a mode name the field; an unregistered mode names the registered ones."""
    base = {"format": mf.FORMAT, "version": 1, "model": {"name": "t", "num_layers": 1, "num_kv_heads": 2,
            "head_dim": 16}}  # fmt: skip
    with pytest.raises(mf.ManifestError, match=r'layers\[0\]\.k_bits: 4 is not valid for k_mode "toy8"'):
        mf.Manifest.from_json({**base, "layers": [{"k_mode": "toy8", "k_bits": 4}]})
    with pytest.raises(mf.ManifestError, match=r"layers\[0\]\.v_mode: .*toy8"):
        mf.Manifest.from_json({**base, "layers": [{"v_mode": "toy9"}]})
    # a mode named in defaults, bits 16 in a layer: that layer is unquantized
    m = mf.Manifest.from_json({**base, "defaults": {"k_mode": "toy8"}, "layers": [{"k_bits": 16}]})
    assert not m.layer(0).k.quantized
