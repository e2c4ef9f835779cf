"""Optional per-layer Hadamard rotation of K (and Q to match) before quantization (DESIGN.md, manifest `rotation`).

An orthonormal rotation H leaves attention scores unchanged, (Hq).(Hk) = q.k, while spreading outlier channels of
the keys over many channels, which makes low-bit key quantization less lossy. For a head_dim that is not a power of
two we use a block-diagonal transform: blocks of the largest power of two dividing head_dim (96 -> three 32-blocks),
each a normalized Sylvester Hadamard matrix. Values are not rotated.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from kvtuner_jax.specs import LayerSpec


@functools.cache
def hadamard_matrix(head_dim: int) -> np.ndarray:
    """Orthonormal block-diagonal Hadamard matrix [head_dim, head_dim] (float32)."""
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    block = head_dim & -head_dim  # largest power of two dividing head_dim
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < block:
        h = np.block([[h, h], [h, -h]])
    h = h / np.sqrt(block)
    return np.kron(np.eye(head_dim // block), h).astype(np.float32)


def rotate(x: jnp.ndarray) -> jnp.ndarray:
    """x [..., D] -> x @ H (same dtype)."""
    h = jnp.asarray(hadamard_matrix(x.shape[-1]))
    return jnp.einsum("...D,DE->...E", x.astype(jnp.float32), h).astype(x.dtype)


def maybe_rotate(spec: LayerSpec, q, k):
    """Rotates q and k (either may be None) when the layer's spec asks for it."""
    if not spec.rotation:
        return q, k
    return (None if q is None else rotate(q)), (None if k is None else rotate(k))
