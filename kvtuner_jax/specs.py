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

    bits: 2, 4, 8, or 16 (= unquantized, stored in the cache's dtype).
    mode: storage mode name ("int" for the integer codes of DESIGN.md; "bf16" is implied by bits == 16).
    axis: "token" (groups of G channels of one token) or "channel" (groups of G tokens of one channel).
    group_size: G. For "token" it divides head_dim; for "channel" it divides the page size.
    symmetric: symmetric codes (scale only) instead of asymmetric (scale and zero-point).
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

        Unquantized (bits 16): `heads * head_dim * cache_dtype_bytes`. Quantized: `heads * head_dim * bits / 8` code
        bytes plus `heads * head_dim / G` groups' parameters per token, for either axis ("token": D/G groups per
        token; "channel": D groups per G tokens). Exact (a Fraction: channel groups amortise over G tokens).
        """
        n = num_kv_heads * head_dim
        if not self.quantized:
            return Fraction(n * cache_dtype_bytes)
        params = Fraction(n, self.group_size) * self.params_per_group * SCALE_DTYPE_BYTES[self.scale_dtype]
        return Fraction(n * self.bits, 8) + params


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Resolved spec of one transformer layer's KV cache."""

    k: KVSpec
    v: KVSpec
    residual_length: int = 0
    rotation: bool = False
