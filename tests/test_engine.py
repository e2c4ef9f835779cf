"""Engine: continuous batching, preemption, sampling, telemetry and the memory planner.

The oracles: (1) the same engine running one request at a time (batching must not change a request's tokens);
(2) `faithful.faithful_logits`, an independent one-pass implementation of decode semantics, teacher-forced over the
engine's outputs: with `prefill_chunk=1` every token enters the cache as a decode step, so each generated token must
be the faithful argmax; with every layer 16-bit the cache is invisible, so chunked prefill must give the same.

The tiny model is made context-sensitive on purpose (untied head, small embeddings, larger attention/MLP outputs):
changing the first half of a 24-token context changes the next-token argmax in ~98% of cases, so a request that read
another's pages would be caught by the content checks below.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvtuner_jax import faithful, model, planner
from kvtuner_jax import manifest as mf
from kvtuner_jax.engine import Engine, Request
from kvtuner_jax.errors import CacheError
from kvtuner_jax.page_table import table_rows
from kvtuner_jax.sampling import SamplingParams
from kvtuner_jax.specs import KVSpec, LayerSpec, ModelIdentity

CFG = dataclasses.replace(model.tiny_config(tie=False), vocab_size=256, eos_token_ids=(2,))
_P = model.init_random_params(CFG, jax.random.key(0))
PARAMS = dataclasses.replace(
    _P,
    embed=_P.embed * 0.3,
    layers=tuple(dataclasses.replace(lp, wo=lp.wo * 3, w_down=lp.w_down * 3) for lp in _P.layers),
)
PAGE = 8
MAX_LEN = 64
QUANT = (
    LayerSpec(KVSpec(4, axis="channel", group_size=8), KVSpec(2, group_size=16), residual_length=4),
    LayerSpec(KVSpec(8, group_size=16), KVSpec(16), residual_length=0),
)
F16 = (LayerSpec(KVSpec(16), KVSpec(16), residual_length=0),) * 2
# The engine and the faithful pass compute the same float32 math in different orders (~1e-6 on logits of scale ~1).
# A token counts as the oracle's argmax when its logit is within 1e-3 of the maximum: far below the median top-2 gap of
# this model (~0.3), so a token computed from someone else's K/V fails, while float noise cannot.
LOGIT_TOL = 1e-3


def make_engine(specs, chunk, max_seqs=4, num_pages=24, **kw):
    return Engine(
        CFG,
        PARAMS,
        specs,
        max_seqs=max_seqs,
        max_seq_len=MAX_LEN,
        page_size=PAGE,
        num_pages=num_pages,
        prefill_chunk=chunk,
        backend="reference",
        **kw,
    )


@pytest.fixture(scope="module")
def quant_engine():
    return make_engine(QUANT, chunk=8)


def record_steps(engine):
    """Wraps the runner's step to record each step's num_new vector."""
    seen = []
    orig = engine.runner.step

    def step(cache, tokens, batch, all_logits=False):
        seen.append(np.asarray(batch.num_new))
        return orig(cache, tokens, batch, all_logits)

    engine.runner.step = step
    return seen


def assert_table_kept(engine) -> None:
    """The engine's kept page-table rows equal rows rebuilt from its running requests' page lists."""
    by_slot = [None] * engine.max_seqs
    for r in engine._running:
        by_slot[r.seq.slot] = r.seq
    np.testing.assert_array_equal(engine._table, table_rows(by_slot, engine.max_pages_per_seq))


def idle(engine) -> bool:
    return (
        not engine.has_unfinished()
        and engine.alloc.num_free == engine.alloc.num_pages
        and sorted(engine._free_slots) == list(range(engine.max_seqs))
    )


def test_staggered_batch_equals_each_request_alone(quant_engine, rng):
    eng = quant_engine
    lengths = [3, 21, 9, 30, 14, 6, 17]
    prompts = [rng.integers(3, CFG.vocab_size, n).tolist() for n in lengths]
    new = [12, 5, 9, 7, 10, 11, 4]
    sp = [SamplingParams(max_new_tokens=n) for n in new]
    alone = []
    for p, s in zip(prompts, sp, strict=True):
        alone.append(eng.generate([p], s)[0])
        assert idle(eng)
    seen = record_steps(eng)
    # Arrivals: 2 now, then one more after each of a few steps, while others are decoding.
    reqs = [eng.add_request(prompts[i], sp[i]) for i in range(2)]
    for i in range(2, len(prompts)):
        for _ in range(2):
            eng.step()
        reqs.append(eng.add_request(prompts[i], sp[i]))
    list(eng.run())
    del eng.runner.step
    assert [r.output for r in reqs] == alone
    assert all(r.finish_reason in ("length", "stop") for r in reqs)
    assert idle(eng)
    # the schedule really mixed prefill chunks with decode tokens in one step, and ran 4 rows at once
    assert any(((nn > 1).any() and (nn == 1).any()) for nn in seen)
    assert max((nn > 0).sum() for nn in seen) == 4


@pytest.mark.parametrize("specs,chunk", [(QUANT, 1), (F16, 8)], ids=["quantized-decode-prefill", "16bit-chunked"])
def test_random_workload(specs, chunk):
    """600 requests, random lengths and arrivals, 4 slots of up to 64 tokens (8 pages each at most) and 12 pages:
    requests are preempted and recomputed; all finish or are rejected; no page leaks; every token is right."""
    rng = np.random.default_rng(7 + chunk)
    eng = make_engine(specs, chunk, num_pages=12)
    reqs, expect_reject = [], []
    n_total = 600
    while len(reqs) < n_total or eng.has_unfinished():
        for _ in range(rng.integers(0, 3) if len(reqs) < n_total else 0):
            kind = rng.random()
            if kind < 0.03:  # longer than max_seq_len: rejected with a reason
                p, n = rng.integers(3, 256, rng.integers(40, 70)).tolist(), 30
            else:
                p, n = rng.integers(3, 256, rng.integers(1, 40)).tolist(), int(rng.integers(1, 20))
            expect_reject.append(len(p) + n > MAX_LEN)
            reqs.append(eng.add_request(p, SamplingParams(max_new_tokens=n)))
        eng.step()
        assert_table_kept(eng)
    assert idle(eng)
    assert (eng._table == -1).all()
    assert eng.num_preemptions > 0  # the pool was really too small for the offered load
    rejected = [r for r in reqs if r.finish_reason == "rejected"]
    assert [r.finish_reason == "rejected" for r in reqs] == expect_reject
    assert rejected and all("max_seq_len" in r.error for r in rejected)
    done = [r for r in reqs if r.finish_reason != "rejected"]
    for r in done:
        assert r.finished and r.finish_reason in ("stop", "length")
        assert (r.finish_reason == "stop") == (r.output[-1] in CFG.eos_token_ids)
        assert r.finish_reason == "stop" or len(r.output) == r.sampling.max_new_tokens
        assert all(t not in CFG.eos_token_ids for t in r.output[:-1])
    # Content: every generated token is the decode-faithful argmax of its own request's tokens.
    toks = np.zeros((len(done), MAX_LEN), np.int32)
    for i, r in enumerate(done):
        toks[i, : len(r.tokens)] = r.tokens
    logits = np.asarray(faithful.faithful_logits(PARAMS, CFG, jnp.asarray(toks), specs, PAGE))
    bad = 0
    for i, r in enumerate(done):
        n = len(r.prompt)
        lg = logits[i, n - 1 : n - 1 + len(r.output)]  # logits at t predict token t + 1
        picked = np.take_along_axis(lg, np.asarray(r.output)[:, None], axis=1)[:, 0]
        bad += int(np.sum(picked < lg.max(-1) - LOGIT_TOL))
    assert bad == 0
    assert sum(r.num_preemptions > 0 for r in done) > 0


def test_steady_state_does_not_recompile(quant_engine, rng):
    eng = quant_engine
    warm = [rng.integers(3, 256, n).tolist() for n in (5, 30)]
    eng.generate(warm, SamplingParams(max_new_tokens=3))
    eng.generate(warm, SamplingParams(max_new_tokens=3, temperature=0.7))
    before = eng.compiles
    assert before <= 4  # T in {1, 8} x greedy/sampling
    for _ in range(3):
        prompts = [rng.integers(3, 256, rng.integers(1, 30)).tolist() for _ in range(6)]
        eng.generate(prompts, SamplingParams(max_new_tokens=int(rng.integers(2, 20)), temperature=0.5, top_k=9))
        eng.generate(prompts, SamplingParams(max_new_tokens=int(rng.integers(2, 20))))
    assert eng.compiles == before
    assert idle(eng)


def test_sampling_is_per_request_and_batch_independent(quant_engine, rng):
    eng = quant_engine
    p = rng.integers(3, 256, 11).tolist()
    others = [rng.integers(3, 256, n).tolist() for n in (25, 4, 13)]
    sp = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, seed=123)
    alone = eng.generate([p], sp)[0]
    r = eng.add_request(p, sp)
    for i, o in enumerate(others):
        eng.add_request(o, dataclasses.replace(sp, seed=i))
    list(eng.run())
    assert r.output == alone
    other_seed = eng.generate([p], dataclasses.replace(sp, seed=124))[0]
    assert other_seed != alone  # 16 tokens at temperature 1 over 50 candidates: equal only by a ~0 chance
    greedy = eng.generate([p], SamplingParams(max_new_tokens=16))[0]
    assert eng.generate([p], dataclasses.replace(sp, top_k=1))[0] == greedy
    assert idle(eng)


def test_rejections_abort_and_zero_tokens(quant_engine, rng):
    eng = quant_engine
    long = rng.integers(3, 256, MAX_LEN).tolist()
    r = eng.add_request(long, SamplingParams(max_new_tokens=1))
    assert r.finish_reason == "rejected" and "max_seq_len 64" in r.error
    assert eng.add_request([], SamplingParams()).error == "the prompt is empty"
    assert "outside the vocabulary" in eng.add_request([3, 999], SamplingParams()).error
    with pytest.raises(CacheError, match="prompt 1: .*exceeds max_seq_len"):
        eng.generate([[5, 6], long], SamplingParams(max_new_tokens=4))
    assert idle(eng)
    z = eng.add_request([5, 6, 7], SamplingParams(max_new_tokens=0))
    assert z.finished and z.output == [] and z.finish_reason == "length"
    small = make_engine(QUANT, chunk=8, num_pages=3)
    r = small.add_request(rng.integers(3, 256, 20).tolist(), SamplingParams(max_new_tokens=30))
    assert r.finish_reason == "rejected" and "holds 3 pages" in r.error
    # abort a running request: its pages come back
    a = eng.add_request(rng.integers(3, 256, 30).tolist(), SamplingParams(max_new_tokens=20))
    b = eng.add_request(rng.integers(3, 256, 10).tolist(), SamplingParams(max_new_tokens=20))
    got = []
    a.on_output = got.append
    for _ in range(6):
        eng.step()
    assert eng.alloc.num_free < eng.alloc.num_pages
    eng.abort(a.request_id)
    assert a.finish_reason == "aborted" and got[-1].finished and got[-1].finish_reason == "aborted"
    assert all(not o.finished for o in got[:-1]) and [o.token for o in got[:-1]] == a.output
    list(eng.run())
    assert b.finish_reason in ("length", "stop") and idle(eng)


def tiny_manifest(bits_k, bits_v, **kw):
    ident = ModelIdentity(CFG.name, CFG.num_layers, CFG.num_kv_heads, CFG.head_dim)
    return mf.uniform(ident, bits_k, bits_v, k_group_size=16, v_group_size=16, **kw)


def test_stats_match_manifest_arithmetic(rng):
    m = tiny_manifest(4, 2, residual_length=4)
    eng = Engine(CFG, PARAMS, m, max_seqs=2, max_seq_len=MAX_LEN, page_size=PAGE, num_pages=16, backend="reference")
    a = eng.add_request(rng.integers(3, 256, 29).tolist(), SamplingParams(max_new_tokens=30))
    b = eng.add_request(rng.integers(3, 256, 6).tolist(), SamplingParams(max_new_tokens=30))
    for _ in range(5):
        eng.step()
    s = eng.stats()
    la, lb = a.seq.length, b.seq.length
    assert (la, lb) == (29 + 4, 6 + 4) and s["tokens_cached"] == la + lb
    # Independent figure: the manifest's own byte arithmetic (float32 tails and 16-bit stores here).
    rep = mf.memory_report(m, page_size=PAGE, cache_dtype_bytes=4)
    assert s["kv_bytes_in_use"] == rep.kv_bytes(la) + rep.kv_bytes(lb)
    assert s["pages_free"] == 16 - (la - 4) // PAGE - (lb - 4) // PAGE
    tails = 2 * 2 * 2 * (4 + PAGE) * CFG.num_kv_heads * CFG.head_dim * 4  # 2 slots x 2 layers x (K+V) x C tokens, f32
    assert s["kv_bytes_reserved"] == (16 - s["pages_free"]) * rep.page_bytes + tails
    assert s["layer_bits"] == [[4, 2], [4, 2]]
    assert s["effective_bits"] == pytest.approx(rep.effective_bits)
    assert "pages free" in eng.stats_line() and "0-1:4/2" in eng.stats_line()
    eng.abort(a.request_id)
    eng.abort(b.request_id)
    assert idle(eng)


def test_planner_budget_and_gain():
    m = tiny_manifest(4, 4)
    specs = m.layer_specs()
    from kvtuner_jax import cache as kc

    cfg = kc.CacheConfig(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim, PAGE, 1, 4, dtype="bfloat16")
    budget = 300_000
    p = planner.plan(specs, cfg, budget_bytes=budget)
    # by hand: a 4-bit element costs 4 bits + (scale + zero) 32 bits per 16 elements = 6 bits; page of all layers:
    elems_page = 2 * CFG.num_layers * CFG.num_kv_heads * CFG.head_dim * PAGE
    assert p.page_bytes == elems_page * 6 // 8
    tails = 4 * 2 * PAGE * 2 * CFG.num_kv_heads * CFG.head_dim * 2  # 4 slots, 2 layers, C = P, K+V, bf16
    assert p.tail_bytes == tails
    assert p.num_pages == (budget - tails) // p.page_bytes
    assert p.pool_bytes <= budget < p.pool_bytes + p.page_bytes
    bf16_pages = (budget - tails) // (elems_page * 2)
    assert p.bf16_num_pages == bf16_pages
    assert p.capacity_gain == pytest.approx(p.num_pages / bf16_pages)
    assert 16 / 6 * 0.9 < p.capacity_gain < 16 / 6 * 1.1
    assert p.effective_bits == pytest.approx(6.0)
    assert p.max_batch(40) == min(4, p.num_pages // 5)
    per_seq = 5 * p.page_bytes + tails // 4
    assert planner.max_batch_for_budget(specs, cfg, budget, 40) == budget // per_seq
    with pytest.raises(CacheError, match="holds no page"):
        planner.plan(specs, cfg, budget_bytes=tails)
    assert any("max concurrent tokens" in line for line in p.lines())


def test_fill_random_runs_decode_steps(quant_engine):
    eng = quant_engine
    reqs = eng.fill_random(3, 40, seed=1, sampling=SamplingParams(max_new_tokens=5))
    assert_table_kept(eng)
    seen = record_steps(eng)
    outs = list(eng.run())
    assert all(len(r.output) == 5 for r in reqs) and len(outs) == 15
    del eng.runner.step
    assert all(nn.max() == 1 for nn in seen)  # decode only, no prefill
    assert idle(eng)


MESH_SCRIPT = r"""
import dataclasses, json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from test_engine import CFG, PARAMS, QUANT, F16, PAGE, MAX_LEN
from kvtuner_jax.engine import Engine, Request
from kvtuner_jax.sampling import SamplingParams
from kvtuner_jax.sharding import mesh_from_flag

rng = np.random.default_rng(0)
prompts = [rng.integers(3, 256, n).tolist() for n in (3, 21, 9, 30, 14, 6, 17, 25)]
outs = {}
# quantized layers with room to spare, then 16-bit layers on a pool small enough to preempt (a preempted request is
# recomputed with chunked prefill: exact only when every layer is 16-bit, and the two engines preempt differently)
for tag, specs, pages in (("q", QUANT, 14), ("f16", F16, 10)):
    for name, mesh in (("one", None), ("mesh", mesh_from_flag("data=2,model=2"))):
        eng = Engine(CFG, PARAMS, specs, mesh, max_seqs=4, max_seq_len=MAX_LEN, page_size=PAGE, num_pages=pages,
                     prefill_chunk=8, backend="reference")
        k = f"{tag}_{name}"
        outs[k] = eng.generate(prompts, SamplingParams(max_new_tokens=12))
        outs[k + "_idle"] = eng.alloc.num_free == eng.alloc.num_pages
        outs[k + "_preempt"] = eng.num_preemptions
print(json.dumps(outs))
"""


def test_mesh_engine_equals_single_device():
    """4 CPU devices as data=2 x model=2: KV heads split over "model", slots and pages over "data" (each row's pages
    from its own shard, preemption per shard). Greedy outputs equal the single-device engine's (the sharded step only
    reorders the row-parallel sums, ~1e-7, far below this model's top-2 logit gaps)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    p = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT], capture_output=True, text=True, env=env, cwd=repo, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    outs = json.loads(p.stdout.strip().splitlines()[-1])
    for tag in ("q", "f16"):
        assert outs[f"{tag}_mesh"] == outs[f"{tag}_one"]
        assert outs[f"{tag}_one_idle"] and outs[f"{tag}_mesh_idle"]
    assert outs["f16_mesh_preempt"] > 0  # 5 pages per data shard: the per-shard preemption path ran


def test_bf16_attention_precision_reaches_the_kernel_and_keeps_greedy_tokens(rng):
    """precision="bf16" runs the GPU kernel (interpret mode here) with one bf16 operand term; on this model the
    greedy tokens equal the float32 reference engine's (bf16 attention error ~1e-3 << the median top-2 gap ~0.3)."""
    prompts = [rng.integers(3, 256, n).tolist() for n in (40, 21)]
    sp = SamplingParams(max_new_tokens=4)
    kw = dict(max_seqs=2, max_seq_len=MAX_LEN, page_size=16, num_pages=8, prefill_chunk=8)  # kernel pages >= 16
    specs = (  # what the GPU kernel lays out at head_dim 16 (per-token 2/4-bit rows would be under 16 bytes)
        LayerSpec(KVSpec(4, axis="channel", group_size=8), KVSpec(8, group_size=16), residual_length=4),
        LayerSpec(KVSpec(8, group_size=8, symmetric=True), KVSpec(16), residual_length=0),
    )
    ref_engine = Engine(CFG, PARAMS, specs, backend="reference", **kw)
    assert ref_engine.runner.precision == "auto"  # the default: resolved per layer by the dispatcher
    ref = ref_engine.generate(prompts, sp)
    eng = Engine(CFG, PARAMS, specs, backend="gpu", interpret=True, precision="bf16", **kw)
    assert eng.runner.precision == "bf16"
    assert eng.generate(prompts, sp) == ref
    with pytest.raises(CacheError, match="precision"):
        make_engine(QUANT, chunk=8, precision="fp32")


def test_gpu_page_cap_keeps_1_byte_pools_addressable():
    """On GPU the planner's page count is capped so a layer's uint8 pool has at most 2^31 elements (Triton offsets);
    8-bit per-token K at 8 heads x 64 x 128 per page gives 2^31 / 2^16 = 32768 pages; other backends are not capped."""
    from kvtuner_jax import cache as kc
    from kvtuner_jax.engine import _gpu_page_cap

    cfg = kc.CacheConfig(32, 8, 128, 64, 1, 1, dtype="bfloat16")
    specs = (LayerSpec(KVSpec(4, group_size=128), KVSpec(4, group_size=128)),) * 3 + (
        LayerSpec(KVSpec(8, group_size=128), KVSpec(16)),
    )
    assert _gpu_page_cap(specs, cfg, "gpu") == 32768
    assert _gpu_page_cap(specs[:3], cfg, "gpu") == 65536  # 4-bit rows are half as wide
    assert _gpu_page_cap(specs, cfg, "reference") > 2**40


def test_token_span_equals_slicing_the_whole_history(rng):
    """Request.token_span(a, b) is tokens[a:b] for spans inside the prompt, inside the output and across both."""
    for _ in range(200):
        p, o = int(rng.integers(0, 12)), int(rng.integers(0, 12))
        req = Request(0, list(rng.integers(0, 100, p)), SamplingParams(), frozenset(), 0)
        req.output = list(rng.integers(100, 200, o))
        a = int(rng.integers(0, p + o + 1))
        b = int(rng.integers(a, p + o + 3))
        assert req.token_span(a, b) == req.tokens[a:b], (p, o, a, b)


def test_a_row_overflow_is_a_clear_error_and_frees_the_pages(quant_engine):
    """Granting pages past a page-table row (the engine never asks for that: longer requests are rejected first)
    raises, names the slot, and gives the pages back."""
    eng = quant_engine
    (req,) = eng.fill_random(1, 40, seed=2, sampling=SamplingParams(max_new_tokens=2))
    free = eng.alloc.num_free
    extra = eng.max_pages_per_seq - len(req.seq.pages) + 1
    with pytest.raises(CacheError, match=f"slot {req.seq.slot} would own"):
        eng._grant(req, eng.alloc.allocate(extra))
    assert eng.alloc.num_free == free
    assert_table_kept(eng)
    list(eng.run())
    assert idle(eng)
