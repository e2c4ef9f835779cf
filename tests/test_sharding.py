"""Tensor and data parallelism: many devices give what one device gives.

Oracles:
- The KV-head rewrite (`plan_heads` + `pad_params`: replicated or zero-padded heads, padded MLP) is checked against an
  independent float32 numpy forward (tests/numpy_llama.py) of the original weights: the rewritten model must compute
  the same logits.
- Sharded runs (meshes model=1, 2, 4, 6, 8 and data x model) are checked against the same runner on one device
  (`mesh=None`, itself tested against dense and decode-faithful logits in test_model_cache.py): the logits of every
  token of a chunked prefill plus greedy decode, and the greedy tokens, with a mixed 2/4/8/16-bit manifest, through
  the pure-jnp reference and through the Pallas kernels (GPU/Triton lowering in interpret mode).
- The compiled step's HLO holds the all-reduces of row-parallel layers and no collective that moves KV-cache data.

Device tests need 8 CPU devices, which must be configured before JAX starts. So that they do not depend on which
test module first started JAX in this process, they run in a fresh child process (`test_multi_device_checks`
re-runs this file with KVTUNER_SHARDING_CHILD=1 and XLA_FLAGS set); in the parent they are skipped, in the child
they run (and the device-free tests are skipped there). The parent test fails when any device test fails or is
skipped in the child.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

CHILD = os.environ.get("KVTUNER_SHARDING_CHILD") == "1"
if CHILD and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import numpy_llama  # noqa: E402
import pytest  # noqa: E402

from kvtuner_jax import cache as kc  # noqa: E402
from kvtuner_jax import model  # noqa: E402
from kvtuner_jax import sharding as sh  # noqa: E402
from kvtuner_jax.errors import CacheError  # noqa: E402
from kvtuner_jax.page_table import SequencePages  # noqa: E402
from kvtuner_jax.runtime import ModelRunner, make_batch  # noqa: E402
from kvtuner_jax.specs import KVSpec, LayerSpec  # noqa: E402

multi = pytest.mark.skipif(not CHILD, reason="runs in the 8-device child process of test_multi_device_checks")
parent = pytest.mark.skipif(CHILD, reason="device-free test: runs in the parent process only")

# Two tiny models. head_dim 32 and page 16 are the smallest the GPU kernel takes for these specs.
# "kv4": 8 query / 4 KV heads, vocabulary 128 (vocab-parallel embedding over 2, 4, 8 shards), MLP 80.
# "kv3": SmolLM2's ratio, 9 query / 3 KV heads, vocabulary 97 (replicated embedding), MLP 80 (padded over 6 shards).
CFGS = {
    "kv4": dataclasses.replace(
        model.tiny_config(), vocab_size=128, hidden_size=64, num_heads=8, num_kv_heads=4, head_dim=32
    ),
    "kv3": dataclasses.replace(
        model.tiny_config(qkv_bias=True), hidden_size=64, num_heads=9, num_kv_heads=3, head_dim=32
    ),
}
PAGE = 16
MIXED = (
    LayerSpec(KVSpec(2, axis="channel", group_size=16), KVSpec(4, group_size=32), residual_length=4),
    LayerSpec(KVSpec(8, symmetric=True, group_size=16), KVSpec(16), residual_length=0),
)
PROMPT_LENS = (45, 30)
DECODE_STEPS = 5
CHUNK = 8  # every step (prefill chunks and decode) uses T = 8: one compiled signature per run
# float32 everywhere; sharded and single-device runs differ only in the order of the row-parallel sums (relative
# ~1e-7 per layer), and quantization is done on the same values up to that. 1e-4 absolute on logits of size ~1-5
# is far below any real error (a wrong head or page moves logits by > 1e-1; 2-bit keys alone move them ~1e-1).
ATOL = 1e-4


@functools.cache
def params_of(name):
    return model.init_random_params(CFGS[name], jax.random.key(0))


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces (run in any process)


@parent
def test_mesh_flag_parsing():
    assert sh.parse_mesh_flag("data=2,model=4") == {"data": 2, "model": 4}
    assert sh.parse_mesh_flag("model=8") == {"data": 1, "model": 8}
    assert sh.parse_mesh_flag(" data = 1 , model=-1 ") == {"data": 1, "model": -1}
    assert sh.mesh_from_flag("") is None and sh.mesh_from_flag(None) is None
    for bad in ("tensor=2", "model=0", "model=x", "model", "model=2,model=2", "data=-1,model=-1"):
        with pytest.raises(sh.ShardingError):
            sh.parse_mesh_flag(bad)
    with pytest.raises(sh.ShardingError, match="does not use exactly"):
        sh.make_mesh(3, 5)


@parent
def test_head_plans_follow_the_stated_rule():
    p = sh.plan_heads(8, 4, 80, 2)  # divides: plain sharding
    assert p.rule == "shard" and p.kv_src == (0, 1, 2, 3) and p.q_src == tuple(range(8))
    p = sh.plan_heads(8, 4, 80, 8)  # 4 KV heads over 8 shards: each replicated twice, 1 query head per copy
    assert p.rule == "replicate" and p.kv_src == (0, 0, 1, 1, 2, 2, 3, 3) and p.q_src == tuple(range(8))
    p = sh.plan_heads(9, 3, 80, 6)  # SmolLM2 over 6: 2 copies per KV head, 3 query heads -> 2 + (1 + zero head)
    assert p.rule == "replicate" and p.kv_src == (0, 0, 1, 1, 2, 2)
    assert p.q_src == (0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1) and p.mlp == 84
    p = sh.plan_heads(9, 3, 80, 2)  # SmolLM2 over 2: pad to 4 KV heads (3 zero query heads)
    assert p.rule == "pad" and p.kv_src == (0, 1, 2, -1) and p.q_src == tuple(range(9)) + (-1,) * 3
    for hq, h, m in ((8, 4, 2), (8, 4, 8), (9, 3, 2), (9, 3, 4), (9, 3, 6), (9, 3, 8), (4, 2, 8), (30, 5, 4)):
        p = sh.plan_heads(hq, h, 80, m)
        g = p.q_heads // p.kv_heads
        assert p.kv_heads % m == 0 and p.q_heads % p.kv_heads == 0 and p.mlp % m == 0
        assert sorted(s for s in p.q_src if s >= 0) == list(range(hq))  # every query head exactly once
        for i, s in enumerate(p.q_src):  # ... and it reads (a copy of) its own KV head
            if s >= 0:
                assert p.kv_src[i // g] == s // (hq // h)


def _hf(params, cfg) -> dict:
    """Our params (x @ w orientation) -> HF names, [out, in], for numpy_llama."""
    w = {"model.embed_tokens.weight": np.asarray(params.embed), "model.norm.weight": np.asarray(params.final_norm)}
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj"}
    names |= {"w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    for i, lp in enumerate(params.layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.asarray(lp.attn_norm)
        w[p + "post_attention_layernorm.weight"] = np.asarray(lp.mlp_norm)
        for ours, hf in names.items():
            w[p + hf + ".weight"] = np.asarray(getattr(lp, ours)).T
        for b, n in (("bq", "q"), ("bk", "k"), ("bv", "v")):
            if getattr(lp, b) is not None:
                w[p + f"self_attn.{n}_proj.bias"] = np.asarray(getattr(lp, b))
    return w


@parent
@pytest.mark.parametrize("name,m", [("kv4", 8), ("kv3", 2), ("kv3", 6)])
def test_rewritten_heads_compute_the_same_model(name, m, rng):
    """Replicated / zero-padded heads and padded MLP give the original logits (independent numpy forward)."""
    cfg, params = CFGS[name], params_of(name)
    plan = sh.plan_for(cfg, m)
    assert not plan.identity
    pcfg = sh.padded_config(cfg, plan)
    padded = sh.pad_params(params, cfg, plan)
    assert padded.layers[0].wk.shape == (cfg.hidden_size, plan.kv_heads * cfg.head_dim)
    x = rng.integers(3, cfg.vocab_size, 12)
    want = numpy_llama.forward(_hf(params, cfg), cfg.to_hf_config(), x)
    got = numpy_llama.forward(_hf(padded, pcfg), pcfg.to_hf_config(), x)
    # Same float32 numpy ops on the real heads; the zero heads add exact zeros. Only summation order inside
    # matmuls over the padded widths can differ.
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.abs(want).max() > 0.5  # not a degenerate model


@parent
def test_placement_is_checked_on_the_host():
    alloc = sh.ShardedPageAllocator(8, 2)
    assert alloc.allocate(2, shard=1) == [4, 5] and alloc.allocate(1, shard=0) == [0]
    assert alloc.num_free == 5 and alloc.num_free_in(1) == 2
    alloc.free([5])
    assert alloc.allocate(1, shard=1) == [5]
    pt = np.array([[0, 1, -1], [4, 5, -1]], np.int32)
    sh.check_batch_placement(pt, [0, 1], [1, 1], num_pages=8, max_seqs=2, data=2)
    with pytest.raises(CacheError, match="row 1 .*pages \\[1\\]"):
        sh.check_batch_placement(np.array([[0, -1], [4, 1]]), [0, 1], [1, 1], num_pages=8, max_seqs=2, data=2)
    with pytest.raises(CacheError, match="slot 0 outside"):
        sh.check_batch_placement(pt, [0, 0], [1, 1], num_pages=8, max_seqs=2, data=2)
    with pytest.raises(sh.ShardingError, match="num_pages=7"):
        sh.ShardedPageAllocator(7, 2)


# ---------------------------------------------------------------------------------------------------------------
# Multi-device checks (child process, 8 CPU devices)


def _runner(name, mesh, backend):
    cfg = CFGS[name]
    cc = kc.CacheConfig(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, PAGE, 8, 2, dtype="float32")
    interpret = backend != "reference" and jax.default_backend() == "cpu"  # compiled kernels on a GPU host
    return ModelRunner(cfg, params_of(name), MIXED, cc, backend=backend, interpret=interpret, mesh=mesh)


def run_greedy(runner, name):
    """Chunked prefill of two prompts, then greedy decode; every step has T = CHUNK.

    Returns (logits of every fed token per row [n, V], generated tokens per row).
    """
    cfg = CFGS[name]
    prompts = [list(np.random.default_rng(7 + i).integers(3, cfg.vocab_size, n)) for i, n in enumerate(PROMPT_LENS)]
    data = runner.data_shards
    alloc = sh.ShardedPageAllocator(runner.cache_cfg.num_pages, data)
    seqs = [SequencePages(slot=i) for i in range(2)]  # row i = slot i = data shard i * data // 2
    feed = [list(p) for p in prompts]  # tokens still to feed per row
    logits_rows, gen = [[], []], [[], []]
    cache = runner.init_cache()
    while any(feed):
        n = [min(CHUNK, len(f)) for f in feed]
        toks = np.zeros((2, CHUNK), np.int32)
        for i, s in enumerate(seqs):
            toks[i, : n[i]] = feed[i][: n[i]]
            s.pages += alloc.allocate(runner.pages_for(s.length + n[i]) - len(s.pages), shard=i * data // 2)
        out, cache = runner.step(cache, toks, make_batch(seqs, n, 4), all_logits=True)
        out = np.asarray(out)
        for i, s in enumerate(seqs):
            feed[i] = feed[i][n[i] :]
            s.length += n[i]
            if n[i]:
                logits_rows[i].append(out[i, : n[i]])
            if not feed[i] and len(gen[i]) < DECODE_STEPS:  # prompt done: greedy next token, fed next step
                tok = int(np.argmax(out[i, n[i] - 1]))
                gen[i].append(tok)
                if len(gen[i]) < DECODE_STEPS:
                    feed[i] = [tok]
    return [np.concatenate(r) for r in logits_rows], gen


@functools.cache
def one_device(name, backend):
    return run_greedy(_runner(name, None, backend), name)


MESH_CASES = [
    # (model, data, model shards, backend, head rule). Every case is one compile, so each covers several things:
    ("kv4", 1, 1, "reference", "shard"),
    ("kv4", 1, 2, "reference", "shard"),
    ("kv4", 1, 8, "reference", "replicate"),  # 4 KV heads over 8 shards, vocab-parallel over 8
    ("kv4", 2, 4, "reference", "shard"),  # data x model (model=4); its compile is reused by the HLO test
    ("kv3", 1, 6, "reference", "replicate"),  # 3 KV heads x2, a zero query head per copy, MLP 80 -> 84
    ("kv3", 2, 2, "gpu", "pad"),  # kernels (interpret) + 3 KV heads padded to 4 + data axis
]


@functools.cache
def runner_for(name, data, m, backend):
    return _runner(name, sh.make_mesh(data, m, jax.devices()[: data * m]), backend)


@multi
@pytest.mark.parametrize("name,data,m,backend,rule", MESH_CASES)
def test_mesh_matches_one_device(name, data, m, backend, rule):
    runner = runner_for(name, data, m, backend)
    assert runner.head_plan.rule == rule
    want_logits, want_tokens = one_device(name, backend)
    got_logits, got_tokens = run_greedy(runner, name)
    assert got_tokens == want_tokens
    for got, want, n in zip(got_logits, want_logits, PROMPT_LENS, strict=True):
        assert got.shape == want.shape == (n + DECODE_STEPS - 1, CFGS[name].vocab_size)
        np.testing.assert_allclose(got, want, atol=ATOL)
    # The cache really is split: each device holds H'/M heads and N/data pages of every pool.
    codes = jax.tree.leaves(runner.init_cache())[0]
    shard = codes.addressable_shards[0].data.shape
    assert shard[0] == runner.head_plan.kv_heads // m and shard[1] == runner.cache_cfg.num_pages // data


@multi
def test_sharded_params_run_the_dense_forward():
    """`shard_params` + the padded cfg under plain jit (no shard_map): the route the eval job's passes take."""
    cfg, params = CFGS["kv3"], params_of("kv3")
    mesh = sh.make_mesh(1, 4, jax.devices()[:4])
    plan, run_cfg, placed = sh.shard_params(params, cfg, mesh)
    assert plan.rule == "pad" and run_cfg.num_kv_heads == 4 and "3->4 (pad)" in sh.describe(mesh, cfg)
    assert placed.layers[0].wk.addressable_shards[0].data.shape == (cfg.hidden_size, cfg.head_dim)  # 1 head each
    tokens = np.random.default_rng(3).integers(3, cfg.vocab_size, (2, 24))
    dense = jax.jit(model.logits_dense, static_argnums=1)
    want = np.asarray(dense(params, cfg, tokens))
    got = np.asarray(dense(placed, run_cfg, tokens))
    np.testing.assert_allclose(got, want, atol=ATOL)  # same reasoning as ATOL: only sum order differs


@multi
def test_kernel_path_agrees_with_reference_on_one_device():
    """The 1-device kernel baseline used above is itself the reference's answer (bf16-split products: 2e-3)."""
    ref, ref_tokens = one_device("kv3", "reference")
    ker, ker_tokens = one_device("kv3", "gpu")
    assert ker_tokens == ref_tokens
    for a, b in zip(ker, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-3)


@multi
def test_compiled_step_has_only_the_expected_collectives():
    """data=2 x model=4: all-reduces for the row-parallel wo / w_down, and no collective touching cache arrays.

    Lowered with the exact signature run_greedy used (T = CHUNK, table width 4, all logits), so the compile above is
    reused when that test ran first.
    """
    name = "kv4"
    runner = runner_for(name, 2, 4, "reference")
    cache = runner.init_cache()
    seqs = [SequencePages(slot=0, length=20, pages=[0]), SequencePages(slot=1, length=17, pages=[4])]
    batch = make_batch(seqs, [1, 1], 4)
    fields = (batch.page_table, batch.lengths, batch.num_new, batch.slots)
    gb = kc.BatchInfo(*(sh.put_global(x, s) for x, s in zip(fields, runner._batch_sh_fields(), strict=True)))
    toks = sh.put_global(np.zeros((2, CHUNK), np.int32), runner._tok_sh)
    hlo = runner._fns[True].lower(runner.run_params, cache, toks, gb).compile().as_text()
    counts = sh.expected_collectives(hlo)
    cfg = CFGS[name]
    # Exactly: per layer one all-reduce after wo and one after w_down, plus one for the vocab-parallel embedding
    # lookup (masked local gather + sum); two all-gathers, both of logits (vocab shards over "model", rows over
    # "data") because the step returns them replicated. Nothing else: the cache ops are shard-local.
    assert counts["all-reduce"] == 2 * cfg.num_layers + 1, counts
    assert counts["all-gather"] == 2, counts
    assert counts["all-to-all"] == counts["reduce-scatter"] == counts["collective-permute"] == 0, counts
    cache_dims = set()  # shapes of every cache array, global and per device
    for leaf in jax.tree.leaves(cache):
        cache_dims.add(tuple(leaf.shape))
        cache_dims.add(tuple(leaf.addressable_shards[0].data.shape))
    for line in hlo.splitlines():
        op = re.search(r" (all-gather|all-reduce)(?:-start)?\(", line)
        if not op:
            continue
        shapes = {tuple(int(x) for x in s.split(",") if x) for s in re.findall(r"\[([\d,]*)\]", line)}
        assert not shapes & cache_dims, line
        result = tuple(int(x) for x in re.search(r"= \w+\[([\d,]*)\]", line).group(1).split(","))
        if op.group(1) == "all-gather":
            assert result[-1] == cfg.vocab_size, line  # logits only
        else:
            assert result[-1] == cfg.hidden_size, line  # activations [rows, T, D] only


@parent
def test_multi_device_checks():
    """Runs this file's device tests in a fresh process with 8 CPU devices (see the module docstring)."""
    env = dict(os.environ, KVTUNER_SHARDING_CHILD="1", JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
    r = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=1500)
    tail = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, tail
    m = re.search(r"(\d+) passed(?:, (\d+) skipped)?", r.stdout)
    assert m, tail
    multi_tests = len(MESH_CASES) + 3
    assert int(m.group(1)) == multi_tests and m.group(2) is not None, tail  # every device test ran and passed
