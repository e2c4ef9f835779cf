"""Does the per-layer Hadamard rotation help low-bit keys? Held-out perplexity and KL on SmolLM2, decode-faithful.

For each KV setting (K2/V16, K2/V2, K4/V4) under two grouping schemes ("pertoken": per-token groups of head_dim,
R = 0; "kivi": per-channel keys in groups of 32 tokens, per-token values in groups of 32, R = 32), with and without
rotation, every layer uses the same spec; logits come from `kvtuner_jax.faithful.faithful_logits` (exact decode
semantics in one pass) and are compared with the unquantized model on the same windows.

Windows: whole non-overlapping windows of --seq_len tokens cut from the odd-indexed essays (the search's default
held-out half), --windows of them taken evenly spaced. Page size 32 for both schemes (KIVI groups of 32 tokens must
divide it).

    PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python benchmarks/rotation_eval.py --windows 4 --seq_len 1024 \
        --out notes/rotation_results.json

Prints one markdown table row per setting as it finishes; writes all rows as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvtuner_jax import assets, faithful, weights
from kvtuner_jax.search.profile import make_windows
from kvtuner_jax.specs import KVSpec, LayerSpec

PAGE_SIZE = 32


def layer_spec(scheme: str, k_bits: int, v_bits: int, rotation: bool, head_dim: int) -> LayerSpec:
    if scheme == "pertoken":
        k = KVSpec(bits=k_bits, axis="token", group_size=head_dim)
        v = KVSpec(bits=v_bits, axis="token", group_size=head_dim)
        return LayerSpec(k=k, v=v, residual_length=0, rotation=rotation)
    k = KVSpec(bits=k_bits, axis="channel", group_size=32)
    v = KVSpec(bits=v_bits, axis="token", group_size=32)
    return LayerSpec(k=k, v=v, residual_length=32, rotation=rotation)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1, help="windows per forward pass")
    ap.add_argument("--bits", default="2/16,2/2,4/4", help="comma-separated K/V bit pairs")
    ap.add_argument("--schemes", default="pertoken,kivi")
    ap.add_argument("--out", default="rotation_results.json")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    cfg, params, tok = weights.load_model(None, progress=False)
    held = assets.essay_texts()[1::2]
    toks = make_windows(tok, held, args.seq_len, args.windows)
    batches = [jnp.asarray(toks[i : i + args.batch]) for i in range(0, len(toks), args.batch)]
    n_layers = cfg.num_layers

    def logits_of(spec: LayerSpec) -> list[jnp.ndarray]:
        specs = (spec,) * n_layers
        return [faithful.faithful_logits(params, cfg, b, specs, PAGE_SIZE) for b in batches]

    t0 = time.perf_counter()
    ref = logits_of(layer_spec("pertoken", 16, 16, False, cfg.head_dim))
    ppl_ref = float(
        np.exp(np.mean([float(jnp.mean(faithful.token_nll(lg, b))) for lg, b in zip(ref, batches, strict=True)]))
    )
    print(f"reference: ppl {ppl_ref:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    meta = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": jax.local_device_count(),
        "backend": jax.default_backend(),
        "windows": args.windows,
        "seq_len": args.seq_len,
        "page_size": PAGE_SIZE,
        "essays": "odd-indexed (held-out half)",
        "ppl_reference": ppl_ref,
        "argv": sys.argv,
    }
    rows = []
    print("| scheme | K/V bits | rotation | ppl | delta ppl | KL (nats) | top-1 agree | seconds |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for scheme in args.schemes.split(","):
        for pair in args.bits.split(","):
            kb, vb = (int(x) for x in pair.split("/"))
            for rot in (False, True):
                t0 = time.perf_counter()
                spec = layer_spec(scheme, kb, vb, rot, cfg.head_dim)
                lq = logits_of(spec)
                nll = np.mean([float(jnp.mean(faithful.token_nll(lg, b))) for lg, b in zip(lq, batches, strict=True)])
                kl = np.mean([float(faithful.kl_vs_reference(a, r)) for a, r in zip(lq, ref, strict=True)])
                top1 = np.mean([float(faithful.top1_agreement(a, r)) for a, r in zip(lq, ref, strict=True)])
                row = dict(scheme=scheme, k_bits=kb, v_bits=vb, rotation=rot, ppl=float(np.exp(nll)), kl=float(kl))
                row.update(top1=float(top1), seconds=time.perf_counter() - t0)
                rows.append(row)
                print(
                    f"| {scheme} | {kb}/{vb} | {'yes' if rot else 'no'} | {row['ppl']:.4f} | "
                    f"{row['ppl'] - ppl_ref:+.4f} | {row['kl']:.5f} | {row['top1']:.4f} | {row['seconds']:.0f} |",
                    flush=True,
                )
                with open(args.out, "w") as f:
                    json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"total {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
