"""The TPU attention kernel's matrix-unit work per page, read from its jaxpr on a machine without a TPU.

No TPU is lent anywhere we work, so the TPU kernel cannot be timed. What can be counted is the matmuls its body runs
per grid step (one page here, `pages_per_block=1`), at the benchmark's attention shape (Llama-3.1-8B: head_dim 128,
4 query heads per KV head, one decode token; page 64): each dot's M x N x K, operand dtypes and precision. Two
kinds: the attention dots (q.k and p.v, the same work in any design) and the dequantization's selection dots
(unpacking bytes into channels, expanding group scales over their channels: 0/1 matrices). Work is given in bf16
passes: a dot of bf16 operands is one pass of the MXU; one at `Precision.HIGHEST` (Mosaic's fp32 contract precision)
is counted as 6 passes, as XLA emulates float32 matmuls on a bf16 MXU; float32 operands at default precision are
counted as one pass (Mosaic's default), so the attention column is a lower bound. Selection work is shown two ways,
which bound its cost from both sides: MACs x passes (right where the matrix unit is busy with large operands) and the
number of bf16 passes (right where each small dot costs a fixed pass through the unit, whatever its K).

    PYTHONPATH=. .venv/bin/python benchmarks/tpu_kernel_ops.py --configs 16/16,8/8,4/4,2/2,8/4,kivi4/2
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))

PASSES_HIGHEST = 6


def _sub_jaxprs(params):
    for v in params.values():
        for sub in v if isinstance(v, (list, tuple)) else [v]:
            if hasattr(sub, "eqns"):
                yield sub
            elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                yield sub.jaxpr


def kernel_jaxprs(jaxpr):
    """The body jaxpr of every pallas_call inside `jaxpr`."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn.params["jaxpr"]
        else:
            for sub in _sub_jaxprs(eqn.params):
                yield from kernel_jaxprs(sub)


def dots(jaxpr) -> list[dict]:
    """Every dot_general in `jaxpr` (and its sub-jaxprs: the kernel's `pl.when` branches)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            a, b = (v.aval for v in eqn.invars)
            (ca, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(a.shape[i] for i in ca)
            prec = eqn.params["precision"]
            highest = prec is not None and lax.Precision.HIGHEST in (prec if isinstance(prec, tuple) else (prec,))
            out.append(
                dict(
                    m=math.prod(a.shape) // k,
                    n=math.prod(b.shape) // k,
                    k=k,
                    dtypes=(a.dtype.name, b.dtype.name),
                    passes=PASSES_HIGHEST if highest else 1,
                )  # fmt: skip
            )
        for sub in _sub_jaxprs(eqn.params):
            out += dots(sub)
    return out


def kernel_dots(k_spec, v_spec, *, head_dim: int = 128, page: int = 64, group: int = 4) -> list[dict]:
    """The dots of one grid step of the TPU attention kernel (one page per step), each tagged `attention` when one
    operand is the query or the probabilities (M or N equals the query rows), else `select`."""
    from pallas_kernels import layout, paged_attention_tpu

    b, h, n, mp = 1, 1, 4, 2
    k = layout.allocate(k_spec, h, n, page, head_dim)
    v = layout.allocate(v_spec, h, n, page, head_dim)
    q = jnp.zeros((b, h * group, 1, head_dim), jnp.bfloat16)

    def f(q, *arrs):
        return paged_attention_tpu.paged_attention(
            q, *arrs, k_spec=k_spec, v_spec=v_spec, sm_scale=head_dim**-0.5, pages_per_block=1
        )

    tail = (jnp.zeros((b, mp), jnp.int32), jnp.zeros((b,), jnp.int32))
    closed = jax.make_jaxpr(f)(q, *k, *v, *tail)
    out = [d for body in kernel_jaxprs(closed.jaxpr) for d in dots(body)]
    for d in out:
        d["kind"] = "attention" if group in (d["m"], d["n"]) else "select"
    return out


def main(argv=None) -> None:
    import attention  # benchmarks/attention.py: the config names

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="16/16,8/8,4/4,2/2,8/4,kivi4/2")
    ap.add_argument("--page", type=int, default=64)
    args = ap.parse_args(argv)
    print("config | dots | select MACs x passes | select passes | HIGHEST select dots | attention MACs | select dots")
    for c in args.configs.split(","):
        ds = kernel_dots(*attention.spec_pair(c), page=args.page)
        sel = [d for d in ds if d["kind"] == "select"]
        work = sum(d["m"] * d["n"] * d["k"] * d["passes"] for d in sel)
        att = sum(d["m"] * d["n"] * d["k"] for d in ds if d["kind"] == "attention")
        shapes = " ".join(f"{d['m']}x{d['n']}x{d['k']}{'(HI)' if d['passes'] > 1 else ''}" for d in sel)
        hi = sum(d["passes"] > 1 for d in sel)
        passes = sum(d["passes"] for d in sel)
        print(f"{c} | {len(ds)} | {work} | {passes} | {hi} | {att} | {shapes}", flush=True)


if __name__ == "__main__":
    main()
