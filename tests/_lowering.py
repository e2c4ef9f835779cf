"""Helper for tests that lower kernels for a platform this host lacks (an H100 or a TPU on the CPU-only CI box)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def abstract_mesh(device_kind: str, platform: str) -> jax.sharding.AbstractMesh:
    """A one-device abstract mesh naming the target chip ("NVIDIA H100" / "gpu", "TPU v5 lite" / "tpu"): lowering
    reads the target from it under `jax.sharding.use_abstract_mesh`."""
    dev = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform=platform)
    return jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=dev)


def gpu_attention_lowered(k_spec, v_spec, *, batch=4, pages_per_seq=16, pool_pages=64, page=64, **kw) -> str:
    """Text of `paged_attention_gpu.paged_attention` (with `kw`) lowered for an abstract H100 at the Llama-3.1-8B
    attention shape (32 query / 8 KV heads, head_dim 128, one query token): by default batch 4 x 16 pages of 64 in a
    64-page pool; `batch=32, pages_per_seq=256, pool_pages=8192` is the benchmark's batch 32 x 16K."""
    from pallas_kernels import layout
    from pallas_kernels.paged_attention_gpu import paged_attention

    arrays = [layout.arrays(s, 8, pool_pages, page, 128) for s in (k_spec, v_spec)]
    pools = [
        None if x is None else jax.ShapeDtypeStruct(x.shape, jnp.dtype(x.dtype))
        for a in arrays
        for x in (a.codes, a.scale, a.zero)
    ]
    q = jax.ShapeDtypeStruct((batch, 32, 1, 128), jnp.bfloat16)
    pt, nt = jax.ShapeDtypeStruct((batch, pages_per_seq), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32)

    def f(q, k0, k1, k2, v0, v1, v2, pt, nt):
        return paged_attention(q, k0, k1, k2, v0, v1, v2, pt, nt, k_spec=k_spec, v_spec=v_spec, sm_scale=0.1, **kw)

    with jax.sharding.use_abstract_mesh(abstract_mesh("NVIDIA H100", "gpu")):
        return jax.jit(f).trace(q, *pools, pt, nt).lower(lowering_platforms=("cuda",)).as_text()
