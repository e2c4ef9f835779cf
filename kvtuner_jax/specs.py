"""Resolved per-layer KV storage specs: what a manifest means for one layer, after defaults and overrides.

These small frozen dataclasses are the one description every other piece reads (cache pool shapes, byte counts,
kernels' static arguments). `kvtuner_jax.manifest` parses and validates JSON into them.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Literal

Axis = Literal["token", "channel"]
VALID_BITS = (2, 4, 8, 16)
SCALE_DTYPES = ("float16", "bfloat16")
# Bytes of one stored scale/zero-point per `scale_dtype` name (kept here, jax-free, so byte arithmetic needs no jax).
SCALE_DTYPE_BYTES = {"float16": 2, "bfloat16": 2}


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """The shape a manifest is written for; a manifest cannot be applied to a model of another shape.

    name: model name ("*" matches any name; shapes must still match).
    num_layers: transformer layers. num_kv_heads: KV heads per layer. head_dim: channels per head.
    """

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class KVSpec:
    """How one of K or V of one layer is stored.

    bits: 2, 4, 8, or 16 (= unquantized, stored in the cache's dtype, whatever `mode` says).
    mode: storage mode name, registered in `kvtuner_jax.modes`: "int" (the integer codes of DESIGN.md), "fp8"
        (float8_e4m3fn codes, one scale per token and head; bits 8), "bf16" (unquantized; implied by bits == 16).
    axis: "token" (groups of G channels of one token) or "channel" (groups of G tokens of one channel). Mode "int".
    group_size: G. For "token" it divides head_dim; for "channel" it divides the page size. Mode "int".
    symmetric: symmetric codes (scale only) instead of asymmetric (scale and zero-point). Mode "int".
    scale_dtype: 16-bit float name for scales and zero-points.
    """

    bits: int = 16
    mode: str = "int"
    axis: Axis = "token"
    group_size: int = 64
    symmetric: bool = False
    scale_dtype: str = "float16"

    @property
    def quantized(self) -> bool:
        return self.bits != 16

    @property
    def params_per_group(self) -> int:
        """Stored 16-bit numbers per group: scale (+ zero-point when asymmetric)."""
        return 1 if self.symmetric else 2

    def bytes_per_token(self, num_kv_heads: int, head_dim: int, cache_dtype_bytes: int = 2) -> Fraction:
        """Bytes one token of this store takes in quantized pages, all KV heads: codes + scales (+ zeros).

        Decided by the store's mode (kvtuner_jax.modes; no jax is imported). Unquantized (bits 16):
        `heads * head_dim * cache_dtype_bytes`. "int": `heads * head_dim * bits / 8` code bytes plus
        `heads * head_dim / G` groups' parameters per token, for either axis ("token": D/G groups per token;
        "channel": D groups per G tokens). "fp8": `heads * head_dim` code bytes plus one scale per head. Exact (a
        Fraction: channel groups amortise over G tokens).
        """
        from kvtuner_jax import modes

        return modes.mode_of(self).bytes_per_token(self, num_kv_heads, head_dim, cache_dtype_bytes)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Resolved spec of one transformer layer's KV cache."""

    k: KVSpec
    v: KVSpec
    residual_length: int = 0
    rotation: bool = False
