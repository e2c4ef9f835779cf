"""How often would the fixed softmax's redo run on real attention? Score excess over each split's first block, SmolLM2.

The GPU kernel's fixed softmax (`softmax="fixed"`, pallas_kernels/paged_attention_gpu.py) measures every probability
against the maximum score of its split's first block, per query row, and redoes a split with the running softmax
when that overflowed: where probabilities are f16 operands (small value groups dequantized in f16 at bf16 precision,
the 3.25-bit schedule's layers) when a later score is more than 18 above that reference (base 2: p > 2^18), and where
they are bf16 when the split's sum of p reaches 2^64 (here: a score 64 above it, a lower bound on the sum). A redo is
one (sequence, KV head, split) program run twice. Random benchmark data says nothing about how often that happens on a
real model; this measures it on the embedded model's real queries and keys over held-out essay text.

For each layer, query position t (every --stride-th from --min_pos on, i.e. decoding token t + 1 with t + 1 tokens
in the cache) and query head, scores s_j = q_t . k_j / sqrt(head_dim) for j <= t, in base 2. Splits are runs of
--split_len tokens from 0, their first blocks the first --block tokens of each (the kernel's splits are whole blocks
of pages over the page table, so this is its layout for one sequence at a split length that is a multiple of the
block). A split's excess is max over the split minus max over its first block; a (layer, KV head, position, split)
unit is redone when any of its query rows' excess passes the threshold.

    PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python benchmarks/fixed_softmax_reach.py --windows 2 --seq_len 4096 \
        --out notes/fixed_softmax_reach.json

Prints one table row per (split length, block) and writes the rows, with per-layer fractions, as JSON to --out.
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchmarks/_smollm2.py, imported in main

THRESHOLDS = {"f16 p (18)": 18.0, "bf16 p (64)": 64.0}


def scores_base2(q: jax.Array, k: jax.Array, pos: np.ndarray) -> jax.Array:
    """q [T, Hq, hd], k [T, H, hd] -> scores [H, G, P, T] in base 2 for the query positions `pos`; -inf past each
    position (causal)."""
    t_len, hq, hd = q.shape
    h = k.shape[1]
    qs = q[pos].astype(jnp.float32).reshape(len(pos), h, hq // h, hd)
    s = jnp.einsum("PHGK,THK->HGPT", qs, k.astype(jnp.float32)) * (math.log2(math.e) / math.sqrt(hd))
    return jnp.where(jnp.arange(t_len)[None, :] <= jnp.asarray(pos)[:, None], s, -jnp.inf)


def split_excess(s: jax.Array, pos: np.ndarray, split_len: int, block: int) -> tuple[jax.Array, jax.Array]:
    """s [H, G, P, T] -> (excess [H, G, P, S] of each split's maximum over its first block's, present [P, S]: whether
    split S holds any token of position P's cache)."""
    t_len = s.shape[-1]
    n = -(-t_len // split_len)
    pad = n * split_len - t_len
    sp = jnp.pad(s, ((0, 0), (0, 0), (0, 0), (0, pad)), constant_values=-jnp.inf)
    sp = sp.reshape(*s.shape[:-1], n, split_len)
    whole, first = jnp.max(sp, axis=-1), jnp.max(sp[..., :block], axis=-1)
    present = jnp.arange(n)[None, :] * split_len <= jnp.asarray(pos)[:, None]
    return jnp.where(present, whole - first, 0.0), present


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq_len", type=int, default=4096)
    ap.add_argument("--min_pos", type=int, default=255, help="first query position (its cache holds min_pos + 1)")
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--split_lens", default="512,2048,8192")
    ap.add_argument("--blocks", default="64,128", help="tokens per kernel block (pages_per_block x page)")
    ap.add_argument("--out", default="fixed_softmax_reach.json")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    cfg, params, tok = weights.load_model(None, progress=False)
    toks = make_windows(tok, assets.essay_texts()[1::2], args.seq_len, args.windows)
    pos = np.arange(args.min_pos, args.seq_len, args.stride)
    cases = [(int(a), int(b)) for a in args.split_lens.split(",") for b in args.blocks.split(",")]
    # counts[case][threshold]: [layers, 2] redone units and units; row_max[case]: largest excess seen, per layer
    counts = {c: {n: np.zeros((cfg.num_layers, 2), np.int64) for n in THRESHOLDS} for c in cases}
    row_max = {c: np.full(cfg.num_layers, -np.inf) for c in cases}
    from _smollm2 import layer_activations, write_report

    for w in toks:
        for i, q, k, _ in layer_activations(cfg, params, w):
            s = scores_base2(q[0], k[0], pos)
            for c in cases:
                ex, present = split_excess(s, pos, *c)
                unit_ex = jnp.max(ex, axis=1)  # [H, P, S]: the largest over the KV head's query rows
                row_max[c][i] = max(row_max[c][i], float(jnp.max(ex)))
                n_units = int(jnp.sum(present)) * unit_ex.shape[0]
                for name, thr in THRESHOLDS.items():
                    counts[c][name][i] += (int(jnp.sum((unit_ex > thr) & present[None])), n_units)
        print(f"window done ({time.perf_counter() - t0:.0f} s)", flush=True)

    rows = []
    print("| split length | block | redone, f16 p (> 18) | redone, bf16 p (> 64) | largest excess (layer) |")
    print("|---|---|---|---|---|")
    for c in cases:
        fr = {n: counts[c][n][:, 0].sum() / counts[c][n][:, 1].sum() for n in THRESHOLDS}
        worst = int(np.argmax(row_max[c]))
        row = dict(split_len=c[0], block=c[1], units=int(counts[c]["f16 p (18)"][:, 1].sum()))
        row |= {f"redone_frac {n}": float(f) for n, f in fr.items()}
        row |= dict(max_excess=float(row_max[c][worst]), max_excess_layer=worst)
        row["per_layer_max_excess"] = [float(x) for x in row_max[c]]
        row["per_layer_redone_f16"] = [int(x) for x in counts[c]["f16 p (18)"][:, 0]]
        rows.append(row)
        print(
            f"| {c[0]} | {c[1]} | {fr['f16 p (18)']:.2e} | {fr['bf16 p (64)']:.2e} | "
            f"{row_max[c][worst]:.1f} ({worst}) |",
            flush=True,
        )
    write_report(
        args.out,
        rows,
        t0,
        model="SmolLM2-135M-Instruct (embedded GGUF), float32",
        windows=args.windows,
        seq_len=args.seq_len,
        positions=f"{args.min_pos}..{args.seq_len - 1} every {args.stride}",
        essays="odd-indexed (held-out half)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
