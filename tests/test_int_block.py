"""Mode `int_block` (pallas_kernels/modes/int_block.py): mode `int`'s per-token codes with each page's scales and
zero-points stored in the page's own block.

Oracles: mode `int` itself (the same numerics, stored in other places: a block's code rows must equal int's codes byte
for byte, its rows int's scale and zero-point bytes, and its dequantized pages int's bit for bit), numpy's own view of
the bytes (little-endian float16), and the pure-jnp reference for the Mosaic GPU kernel that reads the blocks
(interpreted here; compiled with KVTUNER_TEST_COMPILED=1 on a Hopper GPU)."""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from kvtuner_jax import manifest as mf
from kvtuner_jax import modes
from kvtuner_jax.specs import KVSpec
from pallas_kernels import layout
from pallas_kernels import paged_attention_mgpu as mg
from pallas_kernels.modes import int_block
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference
from pallas_kernels.quantize_write import dequantize_pages, quantize_pages, quantize_write

sys.path.insert(0, os.path.dirname(__file__))
import test_paged_attention_mgpu as tm  # noqa: E402  (its case builder and reference check)

COMPILED = os.environ.get("KVTUNER_TEST_COMPILED") == "1"


def block(bits, d=128, g=None, symmetric=False, scale_dtype="float16"):
    return KVSpec(bits=bits, axis="token", group_size=g or d, symmetric=symmetric, scale_dtype=scale_dtype,
                  mode="int_block")  # fmt: skip


@pytest.mark.parametrize(
    "bits,page,d,g,symmetric,scale_dtype,pad",
    [
        (4, 64, 128, 128, False, "float16", 0),
        (2, 64, 128, 128, True, "float16", 0),
        (8, 64, 128, 128, False, "bfloat16", 0),
        (4, 32, 64, 32, False, "float16", 0),
        (8, 16, 128, 128, True, "float16", 96),  # 32 bytes of scales in a row of 128: padded
        (2, 16, 64, 64, False, "float16", 0),
    ],
)
def test_blocks_hold_int_modes_bytes(bits, page, d, g, symmetric, scale_dtype, pad):
    """A block is int's code rows (swizzled), then int's scale bytes and zero-point bytes (little-endian, row-major),
    then zero padding to a whole row; dequantized, it gives int's values bit for bit; the layout's shapes and page size
    agree."""
    spec = block(bits, d, g, symmetric, scale_dtype)
    ispec = int_block.as_int(spec)
    h, m = 2, 3
    x = jax.random.normal(jax.random.key(bits * page + d), (h, m, page, d)) * 3.0 + 0.5
    blocks, s, z = quantize_pages(x, spec)
    assert s is None and z is None
    codes, scale, zero = quantize_pages(x, ispec)
    b = np.asarray(blocks)
    want = layout.arrays(spec, h, m, page, d).codes
    assert b.shape == want.shape and b.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(int_block.swizzle_rows(jnp.asarray(b[:, :, :page]))), np.asarray(codes))
    params = [np.asarray(v).view(np.uint8).reshape(h, m, -1) for v in (scale, zero) if v is not None]
    rows = b[:, :, page:].reshape(h, m, -1)
    flat = np.concatenate(params, axis=-1)
    assert rows.shape[-1] - flat.shape[-1] == pad
    np.testing.assert_array_equal(rows[..., : flat.shape[-1]], flat)
    assert not rows[..., flat.shape[-1] :].any()
    # the scales really are where the bytes say: float16/bfloat16 little-endian, read back with numpy's own view
    first = np.asarray(scale)[0, 0, 0, 0]
    assert rows[0, 0, :2].view(np.asarray(scale).dtype)[0] == first
    np.testing.assert_array_equal(
        np.asarray(dequantize_pages(blocks, None, None, spec)), np.asarray(dequantize_pages(codes, scale, zero, ispec))
    )
    assert layout.page_size_of(spec, blocks, d) == page
    assert layout.bytes_per_page(spec, h, page, d) == layout.bytes_per_page(ispec, h, page, d) + h * pad


@pytest.mark.parametrize("w", [16, 32, 64, 128, 256])
def test_swizzle_rows_is_tmas_swizzle(w):
    """`swizzle_rows` moves row r's 16-byte chunk c to c ^ (r S / 128 mod S / 16) within each S-byte span (S =
    min(128, W); rows under 32 bytes stay plain), written here as a numpy loop over bytes; it is its own inverse."""
    x = np.random.default_rng(w).integers(0, 256, (2, 16, w), dtype=np.uint8)
    got = np.asarray(int_block.swizzle_rows(jnp.asarray(x)))
    s = min(128, w)
    want = x.copy()
    if s >= 32:
        for r in range(16):
            for c in range(w // 16):
                span, k = divmod(c, s // 16)
                dst = span * (s // 16) + (k ^ ((r * s // 128) % (s // 16)))
                want[:, r, dst * 16 : dst * 16 + 16] = x[:, r, c * 16 : c * 16 + 16]
        assert not np.array_equal(want, x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(int_block.swizzle_rows(jnp.asarray(got))), x)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(axis="channel", group_size=32), "axis='channel'.*per-token"),
        (dict(bits=3), "bits=3"),
        (dict(group_size=48), "group_size=48 does not divide head_dim=128"),
        (dict(scale_dtype="float32"), "scale_dtype='float32'"),
    ],
)
def test_refuses_what_it_cannot_lay_out(change, match):
    spec = dataclasses.replace(block(4), **change)
    with pytest.raises(ValueError, match=match):
        layout.check_spec(spec, 64, 128)


def test_refuses_pages_its_swizzle_cannot_cover():
    with pytest.raises(ValueError, match="page_size=12: mode 'int_block' stores code rows swizzled in groups of 8"):
        layout.check_spec(block(4), 12, 128)
    layout.check_spec(block(2, d=64), 12, 64)  # rows of 16 bytes stay plain: any page size


def test_manifest_names_the_mode():
    man = mf.Manifest.from_json(
        {
            "format": mf.FORMAT,
            "version": 1,
            "model": {"name": "m", "num_layers": 2, "num_kv_heads": 2, "head_dim": 64},
            "defaults": {"k_mode": "int_block", "v_mode": "int_block", "k_bits": 4, "v_bits": 2},
            "layers": [{}, {"v_mode": "int"}],
        }
    )
    specs = man.layer_specs()
    assert [(s.k.mode, s.v.mode) for s in specs] == [("int_block", "int_block"), ("int_block", "int")]
    assert "int_block" in modes.registered_modes()
    with pytest.raises(ValueError, match="int_block"):
        mf.Manifest.from_json(
            {
                "format": mf.FORMAT,
                "version": 1,
                "model": {"name": "m", "num_layers": 1, "num_kv_heads": 2, "head_dim": 64},
                "defaults": {"k_mode": "int_block", "k_bits": 4, "k_axis": "channel", "k_group_size": 32},
                "layers": [{}],
            }
        ).layer_specs()


def test_write_touches_only_the_named_pages():
    """The write path (the reference; the mode offers no write kernel) into a poisoned pool: the named pages hold
    the quantized blocks, every other page keeps its poison."""
    spec, h, n, p, d = block(4), 2, 7, 64, 128
    pool = jnp.full(layout.codes_shape(spec, h, n, p, d), 0xA5, jnp.uint8)
    x = jax.random.normal(jax.random.key(1), (h, 3, p, d))
    dest = jnp.asarray([5, -1, 2], jnp.int32)
    got, s, z = quantize_write(pool, None, None, x, dest, spec=spec, backend="reference")
    assert s is None and z is None
    want = np.full(pool.shape, 0xA5, np.uint8)
    blocks = np.asarray(quantize_pages(x, spec)[0])
    want[:, 5], want[:, 2] = blocks[:, 0], blocks[:, 2]
    np.testing.assert_array_equal(np.asarray(got), want)


CASES = [
    ((4, 4), dict(symmetric=False)),
    ((2, 2), dict(symmetric=True)),
    ((4, 2), dict(symmetric=False)),
    ((8, 8), dict(symmetric=False)),
]


@pytest.mark.parametrize("bits,opts", CASES)
def test_kernel_reads_blocks_as_the_reference(bits, opts):
    """The Mosaic GPU kernel over blocks (each page's code tile and its rows copied from the one block) against the
    reference, ragged lengths (a full sequence, one ending mid-page, one empty)."""
    ks, vs = block(bits[0], **opts), block(bits[1], **opts)
    args, kw = tm._case(*bits, ks=ks, vs=vs, lengths=[4 * 64, 70, 0], seed=sum(bits))
    assert args[2] is None and args[5] is None and args[1].shape[2] > 64
    tm._check_against_reference(args, kw)


def test_kernel_reads_a_block_side_beside_an_int_side():
    """Keys as blocks, values in mode int's pools (and the reverse): each side read its own way."""
    for ks, vs in (
        (block(4), KVSpec(bits=2, axis="token", group_size=128)),
        (KVSpec(bits=4, axis="token", group_size=128), block(4)),
    ):
        args, kw = tm._case(ks.bits, vs.bits, ks=ks, vs=vs, lengths=[3 * 64 + 5, 64, 1], seed=ks.bits + 7 * vs.bits)
        tm._check_against_reference(args, kw)


def test_kernel_gives_int_modes_results():
    """The same pages as blocks and as mode int's pools: the kernel's outputs agree to float32 rounding (the same
    codes, scales and zero-points, read from other places)."""
    ib = block(4)
    args, kw = tm._case(4, 4, ks=ib, vs=ib, seed=3)
    iargs, ikw = tm._case(4, 4, seed=3)
    got = mg.paged_attention(*args, **kw, interpret=not COMPILED)
    want = mg.paged_attention(*iargs, **ikw, interpret=not COMPILED)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(got[0])).max() > 1e-2


def test_dispatcher_runs_the_kernel_for_blocks(monkeypatch):
    """backend="gpu": mode int_block offers the Mosaic GPU kernel (not the reference)."""
    seen = tm._kernel_results(monkeypatch)
    ib = block(4)
    args, kw = tm._case(4, 4, ks=ib, vs=ib, b=2, seed=5)
    got, _ = paged_attention(*args, **kw, backend="gpu", interpret=not COMPILED)
    want, _ = paged_attention_reference(*args, **kw)
    assert len(seen) == 1
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-3 * np.abs(np.asarray(want)).max())


def test_unsupported_pages_fall_back_under_auto_and_raise_when_asked():
    """Pages of 32 in blocks: the kernel says why; an explicit backend raises that, the reference reads them."""
    ib = block(4)
    args, kw = tm._case(4, 4, ks=ib, vs=ib, b=2, page=32, seed=6)
    why = mg.unsupported(args[0], args[1], args[4], k_spec=ib, v_spec=ib)
    assert why and "int_block" in why and "32" in why
    with pytest.raises(ValueError, match="int_block"):
        paged_attention(*args, **kw, backend="gpu", interpret=True)


@pytest.mark.parametrize("bits", [(4, 4), (2, 2), (8, 8), (4, 2)])
def test_lowers_for_cuda(bits):
    """Compiled lowering checks what the interpreter does not: the TMA boxes of a block's code tile and rows, the
    rows' view as 16-bit values."""
    ks, vs = block(bits[0]), block(bits[1])
    args, kw = tm._case(*bits, ks=ks, vs=vs, b=2, pages=8)

    def f(*a):
        return mg.paged_attention(*a, **kw)

    sds = [None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args]
    assert "mosaic_gpu" in export.export(jax.jit(f), platforms=["cuda"])(*sds).mlir_module()


def test_model_decodes_the_same_as_with_mode_int():
    """A tiny model decoding through the paged cache (reference backend: the writes, flushes and reads all go
    through the mode) gives the same logits, bit for bit, with int_block as with int: the same numbers, stored in
    other places. Mixed per layer (layer 0 int_block keys with int values), so both readers meet in one model."""
    from kvtuner_jax import cache as kc
    from kvtuner_jax import model
    from kvtuner_jax.page_table import PageAllocator, SequencePages
    from kvtuner_jax.runtime import ModelRunner, make_batch
    from kvtuner_jax.specs import ModelIdentity

    tiny = model.tiny_config()
    page = 8
    ident = ModelIdentity("tiny", tiny.num_layers, tiny.num_kv_heads, tiny.head_dim)

    def run(layers):
        man = mf.Manifest.from_json(
            {
                "format": mf.FORMAT,
                "version": 1,
                "model": dataclasses.asdict(ident),
                "defaults": {"k_bits": 4, "v_bits": 2, "residual_length": 4},
                "layers": layers,
            }
        )
        specs = man.layer_specs()
        params = model.init_random_params(tiny, jax.random.key(0))
        tokens = np.asarray(jax.random.randint(jax.random.key(1), (1, 30), 3, tiny.vocab_size))
        cc = kc.CacheConfig(tiny.num_layers, tiny.num_kv_heads, tiny.head_dim, page, 16, 1, dtype="float32")
        runner = ModelRunner(tiny, params, specs, cc, backend="reference")
        cache, alloc, seq, out = runner.init_cache(), PageAllocator(cc.num_pages), SequencePages(slot=0), []
        for _ in range(tokens.shape[1]):
            seq.pages += alloc.allocate(runner.pages_for(seq.length + 1) - len(seq.pages))
            logits, cache = runner.step(cache, tokens[:, seq.length : seq.length + 1], make_batch([seq], [1], 8), True)
            out.append(np.asarray(logits)[0, :1])
            seq.length += 1
        return np.concatenate(out), specs, cache

    want, _, _ = run([{}, {}])
    got, bspecs, cache = run([{"k_mode": "int_block"}, {"k_mode": "int_block", "v_mode": "int_block"}])
    assert [(s.k.mode, s.v.mode) for s in bspecs] == [("int_block", "int"), ("int_block", "int_block")]
    assert cache.layers[1].v.scale is None and cache.layers[1].v.codes.shape[2] > page  # really stored as blocks
    np.testing.assert_array_equal(got, want)
