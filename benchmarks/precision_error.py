"""How much error does the attention kernel's operand precision add to what quantization already costs? SmolLM2.

`precision="high"` feeds the tensor cores two bf16 terms per float32 operand (~1e-5 from the float32 reference);
"bf16" rounds each operand once (~1e-3), and is up to 1.5x faster for per-channel (KIVI) key layers on a GPU
(BENCHMARKS.md). Whether that matters depends on how large the quantization error already is, which random data
cannot say. This takes the embedded model's real queries, keys and values (RoPE applied) over held-out essay text,
layer by layer; pages the first `--seq_len` tokens' K and V under each (K, V) spec; and for the last `--queries`
positions' query rows (decode against the whole paged cache) compares, relative to the norm of exact attention over
the unquantized K and V (float64 numpy):

- quantization: the pure-jnp reference over the quantized pages against exact attention;
- "high" and "bf16": the GPU kernel (`interpret=True`, the same tile math and roundings as compiled) against that
  reference over the same pages.

    PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python benchmarks/precision_error.py --out notes/precision_error.json

Prints one row per spec pair (median and largest over layers) and writes per-layer numbers as JSON to --out.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvtuner_jax import assets, weights
from kvtuner_jax.search.profile import make_windows
from kvtuner_jax.specs import KVSpec
from pallas_kernels.paged_attention import paged_attention_reference
from pallas_kernels.paged_attention_gpu import paged_attention
from pallas_kernels.quantize_write import quantize_pages

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchmarks/_smollm2.py, imported in main

PAGE = 64


def kivi(kb: int, vb: int) -> tuple[KVSpec, KVSpec]:
    """The upstream KVTuner schedule's layer layout: per-channel keys and per-token values, groups of 32, f16 scales."""
    k = KVSpec(kb, axis="channel", group_size=32, scale_dtype="float16") if kb < 16 else KVSpec(16)
    v = KVSpec(vb, axis="token", group_size=32, scale_dtype="float16") if vb < 16 else KVSpec(16)
    return k, v


def per_token(kb: int, vb: int, head_dim: int) -> tuple[KVSpec, KVSpec]:
    return tuple(KVSpec(b, group_size=head_dim, scale_dtype="float16") for b in (kb, vb))


def exact_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """float64: q [B, Hq, D] against all of k, v [T, H, D] -> [B, Hq, D]."""
    b, hq, d = q.shape
    h = k.shape[1]
    qg = q.reshape(b, h, hq // h, d).astype(np.float64)
    s = np.einsum("BHGD,THD->BHGT", qg, k.astype(np.float64)) / math.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("BHGT,THD->BHGD", p, v.astype(np.float64)).reshape(b, hq, d)


def pages_of(x: jax.Array, spec: KVSpec) -> tuple:
    """x [T, H, D] (T a multiple of PAGE) -> the pool arrays of its T / PAGE pages, page i at physical index i."""
    t, h, d = x.shape
    return quantize_pages(jnp.transpose(x.astype(jnp.float32).reshape(t // PAGE, PAGE, h, d), (2, 0, 1, 3)), spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--seq_len", type=int, default=1024, help="cached tokens (a multiple of 64)")
    ap.add_argument("--queries", type=int, default=4, help="query positions (the last ones of the window)")
    ap.add_argument("--pairs", default="kivi2/2,kivi4/2,kivi4/4,kivi8/4,4/4,16/16")
    ap.add_argument("--layers", default="", help="comma-separated layer indices (default: all)")
    ap.add_argument("--out", default="precision_error.json")
    args = ap.parse_args(argv)
    if args.seq_len % PAGE:
        raise SystemExit(f"--seq_len must be a multiple of {PAGE}")

    t0 = time.perf_counter()
    cfg, params, tok = weights.load_model(None, progress=False)
    windows = make_windows(tok, assets.essay_texts()[1::2], args.seq_len + args.queries, args.windows)
    pairs = {}
    for name in args.pairs.split(","):
        kb, vb = (int(x) for x in name.removeprefix("kivi").split("/"))
        pairs[name] = kivi(kb, vb) if name.startswith("kivi") else per_token(kb, vb, cfg.head_dim)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(cfg.num_layers))
    b, n = args.queries, args.seq_len // PAGE
    page_table = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    num_tokens = jnp.full((b,), args.seq_len, jnp.int32)
    sm = 1.0 / math.sqrt(cfg.head_dim)
    from _smollm2 import layer_activations, write_report

    kernels = {
        prec: jax.jit(
            lambda q, *pools, ks, vs, prec=prec: paged_attention(
                q, *pools, page_table, num_tokens, k_spec=ks, v_spec=vs, sm_scale=sm, interpret=True, precision=prec
            ),
            static_argnames=("ks", "vs"),
        )
        for prec in ("high", "bf16")
    }
    reference = jax.jit(
        lambda q, *pools, ks, vs: paged_attention_reference(
            q, *pools, page_table, num_tokens, k_spec=ks, v_spec=vs, sm_scale=sm
        ),
        static_argnames=("ks", "vs"),
    )
    err = {name: {x: [] for x in ("quantization", "high", "bf16")} for name in pairs}
    for w in windows:
        for i, q, k, v in layer_activations(cfg, params, w):
            if i in layers:
                kc, vc = k[0, : args.seq_len], v[0, : args.seq_len]
                qd = q[0, args.seq_len :].astype(jnp.float32)[:, :, None, :]  # [B, Hq, 1, D]
                exact = exact_attention(np.asarray(qd[:, :, 0]), np.asarray(kc), np.asarray(vc))
                norm = np.linalg.norm(exact)
                for name, (ks, vs) in pairs.items():
                    pools = (*pages_of(kc, ks), *pages_of(vc, vs))
                    ref = np.asarray(reference(qd, *pools, ks=ks, vs=vs)[0][:, :, 0], np.float64)
                    err[name]["quantization"].append(float(np.linalg.norm(ref - exact) / norm))
                    for prec, fn in kernels.items():
                        got = np.asarray(fn(qd, *pools, ks=ks, vs=vs)[0][:, :, 0], np.float64)
                        err[name][prec].append(float(np.linalg.norm(got - ref) / norm))
                print(f"layer {i} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    print(
        "| K/V | quantization: median (largest) | high: median (largest) | bf16: median (largest) "
        "| bf16 / quantization |"
    )
    print("|---|---|---|---|---|")
    rows = []
    for name, e in err.items():
        med = {x: float(np.median(v)) for x, v in e.items()}
        top = {x: float(np.max(v)) for x, v in e.items()}
        ratio = float(np.max(np.asarray(e["bf16"]) / np.maximum(np.asarray(e["quantization"]), 1e-30)))
        print(
            f"| {name} | {med['quantization']:.2e} ({top['quantization']:.2e}) | {med['high']:.2e} ({top['high']:.2e}) "
            f"| {med['bf16']:.2e} ({top['bf16']:.2e}) | <= {ratio:.3g} |",
            flush=True,
        )
        rows.append(dict(pair=name, median=med, largest=top, bf16_over_quantization_largest=ratio, per_layer=e))
    write_report(
        args.out,
        rows,
        t0,
        model="SmolLM2-135M-Instruct (embedded GGUF)",
        windows=args.windows,
        seq_len=args.seq_len,
        queries=args.queries,
        layers=layers,
        essays="odd-indexed (held-out half)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
