"""Eval job: metrics against independent computations, the kernel path against the faithful pass, task logic,
determinism, outputs, and the CLI's flag check."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvtuner_jax import eval as ev
from kvtuner_jax import model
from kvtuner_jax.specs import KVSpec, LayerSpec

REPO = Path(__file__).resolve().parent.parent
# head_dim 64 and pages of 16: shapes the GPU kernel supports (it needs >= 16 codes per row of packed bytes).
CFG = dataclasses.replace(model.tiny_config(tie=False), head_dim=64, vocab_size=128)
PARAMS = model.init_random_params(CFG, jax.random.key(3))
PAGE = 16
F16 = (LayerSpec(KVSpec(16), KVSpec(16)),) * 2
QUANT = (
    LayerSpec(KVSpec(4, axis="channel", group_size=16), KVSpec(2, group_size=64), residual_length=4),
    LayerSpec(KVSpec(8, group_size=32), KVSpec(16), residual_length=0),
)
Q2 = (LayerSpec(KVSpec(2, group_size=32), KVSpec(2, group_size=32)),) * 2


def ecfg(**kw):
    base = dict(tasks=("perplexity", "kl"), seq_len=40, num_windows=2, batch_size=2, page_size=PAGE)
    return ev.EvalConfig(**{**base, **kw})


def data(rng, n=2, t=40):
    return ev.EvalData(
        windows=rng.integers(3, CFG.vocab_size, (n, t)).astype(np.int32), agreement_prompts=np.zeros((0, 1))
    )


def entries(*pairs):
    return [ev.entry_of(name, specs) for name, specs in pairs]


def numpy_metrics(logits_q, logits_ref, tokens):
    """float64 numpy: perplexity of tokens under logits_q and KL(ref || q), over predicted positions."""
    lq = np.asarray(logits_q, np.float64)[:, :-1]
    lr = np.asarray(logits_ref, np.float64)[:, :-1]
    lq = lq - lq.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    lr = lr - lr.max(-1, keepdims=True)
    lr = lr - np.log(np.exp(lr).sum(-1, keepdims=True))
    nll = -np.take_along_axis(lq, tokens[:, 1:, None], -1)[..., 0]
    kl = (np.exp(lr) * (lr - lq)).sum(-1)
    return float(np.exp(nll.mean())), float(kl.mean())


def test_metrics_and_16bit_kl_is_zero(rng):
    d = data(rng)
    res = ev.evaluate(PARAMS, CFG, entries(("f16", F16), ("q", QUANT)), d, ecfg(reuse_reference_for_16bit=False))
    f16, q = res
    dense = np.asarray(model.logits_dense(PARAMS, CFG, jnp.asarray(d.windows)))
    ppl, _ = numpy_metrics(dense, dense, d.windows)
    # The 16-bit manifest goes through the faithful pass (not the shortcut): it must equal dense attention. float32
    # logits of two routes differ by ~1e-6, so KL is ~1e-12; 1e-8 is far below any quantized manifest's (> 1e-4).
    assert abs(f16["kl"]) < 1e-8
    assert f16["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert f16["top1_teacher_forced"] == 1.0 and f16["ppl_change_vs_16bit"] == 0.0
    from kvtuner_jax import faithful

    lq = np.asarray(faithful.faithful_logits(PARAMS, CFG, jnp.asarray(d.windows), QUANT, PAGE))
    ppl_q, kl_q = numpy_metrics(lq, dense, d.windows)
    assert q["kl"] > 1e-4 and q["kl"] == pytest.approx(kl_q, rel=1e-4)
    assert q["perplexity"] == pytest.approx(ppl_q, rel=1e-5)
    assert q["tokens_scored"] == 2 * 39
    # bits + 32 bits of f16 scale and zero per group: K0 4 + 32/16, V0 2 + 32/64, K1 8 + 32/32, V1 16
    assert q["effective_bits"] == pytest.approx((6 + 2.5 + 9 + 16) / 4)
    assert q["ppl_change_vs_16bit"] == pytest.approx(ppl_q / ppl - 1, rel=1e-4)


def _engine_vs_faithful(rng, backend, interpret):
    d = data(rng, n=2, t=36)
    cfg = ecfg(tasks=("perplexity", "kl"), seq_len=36, reuse_reference_for_16bit=False)
    man = entries(("q", QUANT))
    want = ev.evaluate(PARAMS, CFG, man, d, cfg)
    got = ev.evaluate(
        PARAMS, CFG, man, d, dataclasses.replace(cfg, path="engine", backend=backend, interpret=interpret)
    )
    for w, g in zip(want, got, strict=True):
        # Decode steps compute K/V with [B, 1] matmuls, the faithful pass with [B, T] ones: ~1e-7 apart, which now
        # and then moves a value across a 2-bit rounding boundary (a code flips, a logit moves ~1e-3). Averaged over
        # 70 positions that stays below 1e-3 relative on perplexity and 2e-3 + 1e-4 absolute on KL; a wrong page,
        # mask or scale moves them by whole percents.
        assert g["perplexity"] == pytest.approx(w["perplexity"], rel=1e-3)
        assert g["kl"] == pytest.approx(w["kl"], rel=2e-2, abs=1e-4)
        assert g["top1_teacher_forced"] == pytest.approx(w["top1_teacher_forced"], abs=0.03)
    assert want[0]["kl"] > 1e-3  # quantization is clearly visible (30x the KL tolerance): agreement means something


def test_engine_path_reference_backend_agrees_with_faithful(rng):
    _engine_vs_faithful(rng, "reference", False)


def _gpu_kernel_works() -> str | None:
    if importlib.util.find_spec("pallas_kernels.paged_attention_gpu") is None:
        return "pallas_kernels/paged_attention_gpu.py does not exist"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_gpu_kernel_works() is not None, reason=str(_gpu_kernel_works()))
def test_engine_path_gpu_kernel_interpret_agrees_with_faithful(rng):
    """The GPU kernels (paged attention + packed write) in interpret mode: the eval numbers match the faithful pass."""
    _engine_vs_faithful(rng, "gpu", True)


def test_engine_path_tpu_kernel_interpret_agrees_with_faithful(rng):
    """The TPU kernels (paged attention + packed write) under the TPU interpreter, as the engine runs them: the eval
    numbers match the faithful pass (per-channel 4-bit keys, per-token 2-bit values unpacked field by field, 8-bit
    keys beside 16-bit values)."""
    _engine_vs_faithful(rng, "tpu", True)


def test_agreement_and_passkey_scoring(rng):
    prompts = rng.integers(3, CFG.vocab_size, (3, 24)).astype(np.int32)
    rows = ev.greedy_continuations(PARAMS, CFG, prompts, 12)
    dense = np.asarray(model.logits_dense(PARAMS, CFG, jnp.asarray(rows)))
    assert np.array_equal(rows[:, 24:], dense[:, 23:-1].argmax(-1))  # really greedy (an independent forward)
    # passkey samples whose answers are the 16-bit model's own greedy tokens (pass) or their successors (fail)
    good = [ev.PasskeySample(r, 30, 3, 36, 0.5, 0) for r in rows]
    bad_rows = rows.copy()
    bad_rows[:, 31] = (bad_rows[:, 31] + 1) % CFG.vocab_size
    bad = [ev.PasskeySample(r, 30, 3, 36, 0.5, 0) for r in bad_rows]
    d = ev.EvalData(np.zeros((0, 40), np.int32), rows, tuple(good + bad))
    cfg = ecfg(tasks=("agreement", "passkey"), agreement_prompt_len=24, agreement_new_tokens=12)
    cfg = dataclasses.replace(cfg, reuse_reference_for_16bit=False)
    f16, q2 = ev.evaluate(PARAMS, CFG, entries(("f16", F16), ("q2", Q2)), d, cfg)
    assert f16["agreement"] == 1.0 and f16["greedy_prefix"] == 1.0
    assert f16["passkey"] == 0.5 and f16["passkey_by_length"] == {"36": 0.5}
    assert q2["agreement"] < 1.0 and q2["greedy_prefix"] <= q2["agreement"]
    # greedy_prefix = first mismatch / n, checked against an explicit free-running greedy decode under Q2
    from kvtuner_jax import faithful

    free = rows.copy()  # one fixed shape; causal, so what follows position t cannot change its logits
    for t in range(24, 36):
        lg = np.asarray(faithful.faithful_logits(PARAMS, CFG, jnp.asarray(free), Q2, PAGE))
        free[:, t] = lg[:, t - 1].argmax(-1)
    same = free[:, 24:] == rows[:, 24:]
    prefix = np.where(same.all(1), 12, np.argmin(same, 1)) / 12
    assert q2["greedy_prefix"] == pytest.approx(prefix.mean())


class CharTokenizer:
    """A stand-in tokenizer: one id per character (mod the tiny vocab), optional BOS."""

    def encode(self, text, add_bos=None):
        ids = [3 + ord(c) % (CFG.vocab_size - 3) for c in text]
        return ([1] if add_bos else []) + ids


def test_build_data_is_deterministic_and_places_the_needle():
    texts = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(3000)) for i in range(3)]
    cfg = ev.EvalConfig(
        tasks=("perplexity", "passkey"),
        seq_len=256,
        num_windows=5,
        passkey_lengths=(400, 600),
        passkey_depths=(0.2, 0.8),
        seed=5,
    )
    tok = CharTokenizer()
    a = ev.build_data(tok, texts, PARAMS, dataclasses.replace(CFG, max_position_embeddings=1024), cfg)
    b = ev.build_data(tok, texts, PARAMS, dataclasses.replace(CFG, max_position_embeddings=1024), cfg)
    assert np.array_equal(a.windows, b.windows) and a.windows.shape == (5, 256)
    assert [s.key for s in a.passkey] == [s.key for s in b.passkey]
    for s in a.passkey:
        assert len(s.tokens) == s.length
        needle = tok.encode(ev.PASSKEY_NEEDLE.format(key=s.key))
        seq = list(s.tokens)
        at = next(i for i in range(len(seq)) if seq[i : i + len(needle)] == needle)
        intro = len(tok.encode(ev.PASSKEY_INTRO))
        fill = s.length - intro - len(needle) - len(tok.encode(ev.PASSKEY_QUESTION)) - s.answer_len
        assert at - intro == round(s.depth * fill)
        assert list(s.tokens[s.answer_start :]) == tok.encode(f" {s.key}")
    c = ev.build_data(tok, texts, PARAMS, CFG, dataclasses.replace(cfg, tasks=("perplexity",), seed=6))
    assert not np.array_equal(a.windows, c.windows)
    with pytest.raises(ev.KVTunerError, match="exceeds the model's context"):
        ev.build_data(tok, texts, PARAMS, dataclasses.replace(CFG, max_position_embeddings=500), cfg)


def test_reports(tmp_path, rng):
    res = ev.evaluate(PARAMS, CFG, entries(("f16", F16), ("q2", Q2)), data(rng), ecfg())
    ev.write_jsonl(res, tmp_path / "r.jsonl")
    back = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["manifest"] for r in back] == ["f16", "q2"] and back[1]["kl"] == res[1]["kl"]
    md = ev.summary_table(res)
    assert md.splitlines()[0].startswith("| manifest | eff. bits | ppl") and "| q2 | 3.00 |" in md
    ev.plot(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_manifest_with_kv_flags():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run(
        [sys.executable, "-m", "kvtuner_jax.eval", "--manifest=configs/smollm2_k4v4.json", "--kv_nbits_value=2"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --manifest cannot be combined")
