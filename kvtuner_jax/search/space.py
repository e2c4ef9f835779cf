"""The candidate space of the search: quant schemes, (K bits, V bits) pairs, and what a choice costs in bits."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from kvtuner_jax.specs import KVSpec, LayerSpec
from pallas_kernels import layout

BITS = (16, 8, 4, 2)
PAIRS: tuple[tuple[int, int], ...] = tuple((k, v) for k in BITS for v in BITS)  # 16/16 first, 2/2 last
SCHEMES = ("pertoken", "kivi")


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How a quantized K or V is stored (everything but the bit width), shared by all candidates of one search.

    "pertoken" (KVTuner's): groups of head_dim channels of one token for K and V, R = 0, pages of 16.
    "kivi" (KIVI's): K per channel in groups of 32 tokens, V per token in groups of 32 channels, R = 32, pages of 32.
    """

    name: str
    k_axis: str
    k_group_size: int
    v_axis: str
    v_group_size: int
    residual_length: int
    page_size: int
    symmetric: bool = False
    scale_dtype: str = "float16"

    def kv_spec(self, bits: int, which: str) -> KVSpec:
        axis, g = (self.k_axis, self.k_group_size) if which == "k" else (self.v_axis, self.v_group_size)
        return KVSpec(bits=bits, axis=axis, group_size=g, symmetric=self.symmetric, scale_dtype=self.scale_dtype)

    def layer_spec(self, k_bits: int, v_bits: int) -> LayerSpec:
        return LayerSpec(k=self.kv_spec(k_bits, "k"), v=self.kv_spec(v_bits, "v"), residual_length=self.residual_length)

    def defaults_json(self) -> dict:
        """The scheme as manifest "defaults" keys (bits come per layer)."""
        return {
            "k_axis": self.k_axis,
            "v_axis": self.v_axis,
            "k_group_size": self.k_group_size,
            "v_group_size": self.v_group_size,
            "k_symmetric": self.symmetric,
            "v_symmetric": self.symmetric,
            "residual_length": self.residual_length,
            "rotation": False,
            "scale_dtype": self.scale_dtype,
        }

    def store_bits(self, bits: int, which: str, head_dim: int) -> float:
        """Stored bits per element of one K or V store, scales and zero-points included (from the pool layout)."""
        spec = self.kv_spec(bits, which)
        return layout.bytes_per_page(spec, 1, self.page_size, head_dim) * 8 / (self.page_size * head_dim)

    def pair_bits(self, k_bits: int, v_bits: int, head_dim: int) -> float:
        """Effective bits per K/V element of one layer (mean of K and V)."""
        return 0.5 * (self.store_bits(k_bits, "k", head_dim) + self.store_bits(v_bits, "v", head_dim))


def make_scheme(name: str, head_dim: int, page_size: int | None = None) -> Scheme:
    """Scheme by name; page_size defaults to 16 (pertoken) or 32 (kivi)."""
    if name == "pertoken":
        return Scheme("pertoken", "token", head_dim, "token", head_dim, 0, page_size or 16)
    if name == "kivi":  # groups of 32, or less where a page (K) or a head (V) is smaller
        p = page_size or 32
        return Scheme("kivi", "channel", min(32, p), "token", min(32, head_dim), 32, p)
    raise ValueError(f"scheme {name!r} is not one of {SCHEMES}")


def nominal_bits(layer_pairs: Sequence[tuple[int, int]]) -> float:
    """Average nominal K/V bits over layers (16 for unquantized), without scale overhead."""
    return sum(k + v for k, v in layer_pairs) / (2 * len(layer_pairs))


def effective_bits(layer_pairs: Sequence[tuple[int, int]], scheme: Scheme, head_dim: int) -> float:
    """Average stored bits per K/V element over layers, scales and zero-points included."""
    return sum(scheme.pair_bits(k, v, head_dim) for k, v in layer_pairs) / len(layer_pairs)
