"""KV storage modes: a registry of named ways to store one K or V store of a layer (issue 8).

A *mode* owns its storage layout and its write and read paths: which arrays a pool holds (always the triple
`(codes, scale, zero)`, scale/zero possibly None), their shapes and dtypes, bytes per token and per page, the
quantize/dequantize numerics (the pure-jnp oracle), and optionally Pallas kernels per backend. The core code
(`pallas_kernels.layout`, `quantize_write`, `paged_attention`, and through them `kvtuner_jax.cache` and
`kvtuner_jax.faithful`) never names a mode: it looks the mode of a `KVSpec` up here, lazily.

Shipped modes:
- `int`: today's integer codes (2/4/8 bits, per-token or per-channel groups, sym/asym; DESIGN.md numerics).
- `bf16`: unquantized, stored in the cache dtype. Any spec with bits == 16 is this mode whatever its `mode` field says
  (16 bits means "unquantized", the short form kept from before modes existed).
- `fp8`: float8_e4m3fn codes with one scale per token and KV head (`pallas_kernels.modes.fp8`).
- `int_block`: `int`'s per-token codes with each page's scale and zero-point rows in the page's own block (one array,
  fewer and larger copies a page for the Mosaic GPU kernel; `pallas_kernels.modes.int_block`).

Registration is by name and module path: `register_mode("fp8", "pallas_kernels.modes.fp8")`; the module is
imported on the first `get_mode("fp8")` and must define `MODE`, an instance of `Mode`. So a mode nobody uses costs
no import and no compile time. A `Mode` instance may also be registered directly (tests, plug-ins).

This module imports no jax, so the manifest can validate mode names and count bytes without it. Mode modules should
keep their module level jax-free for the same reason (import jax inside the array-level methods), so that the
manifest's byte arithmetic stays cheap; the shipped ones do.

Kernel dispatch (pallas_kernels.quantize_write / paged_attention with backend "gpu" or "tpu"): the write path asks
the spec's mode for `write_kernel(backend)`; attention asks K's mode, then V's mode, for
`attention_kernel(backend, k_spec, v_spec)`. `int` and `bf16` return today's kernels (for attention: only when both
K and V are int/bf16). When no kernel is offered, that call falls back to the pure-jnp reference path (correct, but
slow on an accelerator) and a warning is logged once per (mode, path, backend).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
from collections.abc import Callable
from fractions import Fraction
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from kvtuner_jax.specs import KVSpec

__all__ = [
    "ArraySpec",
    "PoolArrays",
    "Mode",
    "register_mode",
    "get_mode",
    "mode_name_of",
    "mode_of",
    "registered_modes",
    "unregister_mode",
    "on_change",
    "is_registered",
    "itemsize",
    "warn_once",
    "BYTES_PAGE_SIZE",
]

log = logging.getLogger("kvtuner_jax.modes")

# Page size the default `Mode.bytes_per_token` measures a page at (any page size the mode supports gives the same
# figure for per-token layouts; modes with groups along time should override bytes_per_token).
BYTES_PAGE_SIZE = 128


def itemsize(dtype: Any) -> int:
    """Bytes of one element of `dtype` (a name such as "bfloat16" or "float8_e4m3fn", or a numpy/jax dtype)."""
    import numpy as np

    name = str(getattr(dtype, "name", dtype))
    try:
        return np.dtype(name).itemsize
    except TypeError:
        import ml_dtypes  # jax's own dtype package; jax-free

        return np.dtype(getattr(ml_dtypes, name)).itemsize


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype (a name, e.g. "uint8", "float8_e4m3fn", "bfloat16") of one pool array."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclasses.dataclass(frozen=True)
class PoolArrays:
    """The arrays of one pool: codes always; scale and zero where the layout has them (None otherwise)."""

    codes: ArraySpec
    scale: ArraySpec | None = None
    zero: ArraySpec | None = None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.codes, self.scale, self.zero) if a is not None)


class Mode:
    """Protocol (with defaults) every storage mode implements. Subclass it and override what differs.

    Spec-level (jax-free; the manifest calls these): `name`, `valid_bits`, `implied_bits`, `canonical`, `validate`,
    `arrays`, `bytes_per_token`, `page_size_of`, `describe`. Array-level (jax): `quantize_pages`, `dequantize_pages`.
    Optional kernel hooks: `write_kernel`, `attention_kernel` (None = use the reference path).

    Shapes: H KV heads, N physical pages (M pages being written), P page size, D head_dim. Pages of values are
    `[H, M, P, D]`; pool arrays lead with `[H, N, ...]` so they shard over heads and a page table indexes axis 1.
    """

    name: str = ""
    valid_bits: tuple[int, ...] = ()  # stored bit widths this mode accepts (16 is always "unquantized", mode bf16)
    implied_bits: int | None = None  # bits a manifest implies when it names this mode but not the bits

    # -- spec level (no jax) --------------------------------------------------------------------------------------

    def canonical(self, spec: KVSpec, head_dim: int) -> KVSpec:
        """The spec with fields this mode ignores set to fixed values (so equal stores compare equal)."""
        return spec

    def validate(self, spec: KVSpec, page_size: int | None, head_dim: int) -> None:
        """Raises ValueError when `spec` cannot be laid out at this page size (None: not known yet) and head_dim."""
        if spec.bits not in self.valid_bits:
            raise ValueError(f"bits={spec.bits} is not valid for mode {self.name!r} (one of {self.valid_bits})")

    def arrays(self, spec: KVSpec, heads: int, pages: int, page_size: int, head_dim: int, cache_dtype: str):
        """PoolArrays of a pool of `pages` pages. cache_dtype: name of the cache's full-precision dtype."""
        raise NotImplementedError

    def bytes_per_token(self, spec: KVSpec, heads: int, head_dim: int, cache_dtype_bytes: int = 2) -> Fraction:
        """Exact bytes of one token in quantized pages, all KV heads (codes + scales + zeros).

        Default: one page of BYTES_PAGE_SIZE tokens, divided by its tokens."""
        dt = {1: "uint8", 2: "bfloat16", 4: "float32"}[cache_dtype_bytes]
        return Fraction(self.arrays(spec, heads, 1, BYTES_PAGE_SIZE, head_dim, dt).nbytes, BYTES_PAGE_SIZE)

    def page_size_of(self, spec: KVSpec, codes_shape: tuple[int, ...], head_dim: int) -> int:
        """Page size P of a pool from its codes array's shape (default: codes are [H, N, P, ...])."""
        return codes_shape[2]

    def describe(self, spec: KVSpec) -> str:
        """A short label for tables (e.g. "8 fp8")."""
        return f"{spec.bits} {self.name}"

    # -- array level (jax) ----------------------------------------------------------------------------------------

    def quantize_pages(self, pages, spec: KVSpec):
        """[H, M, P, D] float -> (codes, scale, zero) for M pages, in the pool layout. Pure jnp; the oracle."""
        raise NotImplementedError

    def dequantize_pages(self, codes, scale, zero, spec: KVSpec, dtype):
        """Pool-layout arrays of some pages `[..., page rows, cols]` -> values `[..., P, D]` in `dtype`."""
        raise NotImplementedError

    # -- kernel hooks ---------------------------------------------------------------------------------------------

    def write_kernel(self, backend: str) -> Callable | None:
        """A page-write kernel for backend "gpu"/"tpu", with the signature of
        `pallas_kernels.quantize_write_gpu.quantize_write` (codes, scale, zero, pages, dest, *, spec, interpret),
        or None (the dispatcher then runs the reference)."""
        return None

    def attention_kernel(self, backend: str, k_spec: KVSpec, v_spec: KVSpec) -> Callable | None:
        """A paged-attention kernel for this (K, V) spec pair, with the signature of
        `pallas_kernels.paged_attention_gpu.paged_attention` (q, k_codes, ..., num_tokens, *, k_spec, v_spec,
        sm_scale, interpret), or None. Asked of K's mode first, then V's."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# ---------------------------------------------------------------------------------------------------------------------
# The registry

_LOADERS: dict[str, str | Mode] = {}  # name -> module path (imported on first use) or a Mode instance
_LOADED: dict[str, Mode] = {}
_WARNED: set[tuple] = set()
_LISTENERS: list[Callable[[str, bool], None]] = []  # told (name, registered?) on every change (the manifest's names)


def on_change(callback: Callable[[str, bool], None]) -> None:
    """Calls `callback(name, True)` for every registered mode now and on each registration, `(name, False)` on each
    removal. kvtuner_jax.manifest uses it to keep the mode names it accepts in step."""
    _LISTENERS.append(callback)
    for name in _LOADERS:
        callback(name, True)


def register_mode(name: str, loader_module: str | Mode, *, replace: bool = False) -> None:
    """Registers mode `name`, implemented by the module at `loader_module` (must define `MODE`, a Mode) or given as
    a Mode instance. Re-registering a name with a different implementation needs `replace=True`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"mode name must be a non-empty string, got {name!r}")
    if not isinstance(loader_module, str | Mode):
        raise TypeError(f"mode {name!r}: expected a module path or a Mode instance, got {type(loader_module).__name__}")
    if isinstance(loader_module, Mode) and loader_module.name != name:
        raise ValueError(f"mode registered as {name!r} calls itself {loader_module.name!r}")
    old = _LOADERS.get(name)
    if old is not None and old is not loader_module and old != loader_module and not replace:
        raise ValueError(f"mode {name!r} is already registered ({old!r}); pass replace=True to override it")
    _LOADERS[name] = loader_module
    _LOADED.pop(name, None)
    for cb in _LISTENERS:
        cb(name, True)


def unregister_mode(name: str) -> None:
    """Removes a registered mode (tests that register toy modes clean up with this)."""
    _LOADERS.pop(name, None)
    _LOADED.pop(name, None)
    for cb in _LISTENERS:
        cb(name, False)


def registered_modes() -> tuple[str, ...]:
    """Names of all registered modes, sorted (nothing is imported)."""
    return tuple(sorted(_LOADERS))


def is_registered(name: Any) -> bool:
    return isinstance(name, str) and name in _LOADERS


def get_mode(name: str) -> Mode:
    """The Mode registered as `name`, importing its module on first use. ValueError for an unknown name."""
    mode = _LOADED.get(name)
    if mode is not None:
        return mode
    if name not in _LOADERS:
        raise ValueError(f"storage mode {name!r} is not registered (registered: {', '.join(registered_modes())})")
    target = _LOADERS[name]
    if isinstance(target, Mode):
        mode = target
    else:
        module = importlib.import_module(target)
        mode = getattr(module, "MODE", None)
        if not isinstance(mode, Mode):
            raise TypeError(f"module {target} (mode {name!r}) defines no MODE (a kvtuner_jax.modes.Mode instance)")
        if mode.name != name:
            raise ValueError(f"module {target} registered as mode {name!r} defines mode {mode.name!r}")
    _LOADED[name] = mode
    return mode


def mode_name_of(spec: KVSpec) -> str:
    """The mode a spec is stored in: "bf16" when bits == 16 (unquantized), else `spec.mode`."""
    return "bf16" if spec.bits == 16 else spec.mode


def mode_of(spec: KVSpec) -> Mode:
    """The Mode object of a spec (see `mode_name_of`)."""
    return get_mode(mode_name_of(spec))


def warn_once(key: tuple, message: str) -> None:
    """Logs `message` as a warning the first time `key` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message)


register_mode("int", "pallas_kernels.modes.int_mode")
register_mode("bf16", "pallas_kernels.modes.bf16")
register_mode("fp8", "pallas_kernels.modes.fp8")
register_mode("int_block", "pallas_kernels.modes.int_block")
