"""The KV-cache manifest: which bit width and layout every layer's K and V are stored at.

A manifest is JSON (format "kvtuner-jax-manifest", version 1):

```
{
  "format": "kvtuner-jax-manifest", "version": 1,
  "model": {"name": "SmolLM2-135M-Instruct", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64},
  "defaults": {"k_bits": 16, "v_bits": 16, ...},       # optional; any subset of LAYER_KEYS
  "layers": [{"k_bits": 8, "v_bits": 4}, ...],        # exactly num_layers entries, each any subset of LAYER_KEYS
  "metadata": {...}                                    # optional, free-form: provenance, source file, notes
}
```

`layers` may also be an object keyed by "0".."N-1" or by HuggingFace module names ("model.layers.7.self_attn" or
"model.layers.7"); loading normalises it to the list. A manifest keeps exactly what was given (defaults are not
expanded into layers), so JSON -> Manifest -> JSON reproduces canonical input exactly.

Resolution of one layer: built-in defaults (BUILTIN_DEFAULTS; a group size left unset means head_dim) <- `defaults`
<- the layer's entry. Validation errors are ManifestError whose path names the JSON location at fault, e.g.
`layers[7].k_bits: 3 is not one of 2, 4, 8, 16`. Unknown fields are errors.

Group sizes: axis "token" groups G channels of one token, so G must divide head_dim. Axis "channel" groups G tokens
of one channel; G must be a power of two <= 128 here, and it must also divide the cache's page size, which only the
cache (or `memory_report(page_size=...)`) knows and checks. Group sizes are checked only where the store is quantized.

Storage modes: `k_mode` / `v_mode` name a mode registered in `kvtuner_jax.modes`: "int" (the default; bits 2, 4, 8, or
16 = unquantized, the short form), "int_block" (int's per-token codes with each page's scales and zero-points inside the
page's block; bits 2, 4, 8; axis "token" only), "fp8" (float8_e4m3fn codes with one scale per token and KV head; bits 8)
or "bf16" (unquantized; bits 16). A mode named at a more specific level than the bits (a layer entry under `defaults`
bits, or `defaults` over the built-ins) brings its own bits, so `{"k_mode": "fp8"}` alone means 8-bit fp8; bits given
beside the mode must fit it (`layers[3].k_bits: 4 is not valid for k_mode "fp8" ...`), and bits 16 always means
unquantized whatever the mode. fp8 ignores the int-only fields (axis, group size, symmetric); its resolved spec has them
canonicalised (axis "token", G = head_dim, symmetric). Byte counts come from the mode (fp8: 1 byte per element plus one
16-bit scale per token and head) and need no jax.

Also here: `uniform` / `mixed` presets, the loader of KVTuner's own YAML presets (`from_kvtuner_yaml`), the memory
arithmetic (`memory_report`), and the CLI `python -m kvtuner_jax.manifest describe FILE`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kvtuner_jax import modes
from kvtuner_jax.errors import ManifestError
from kvtuner_jax.specs import SCALE_DTYPES, VALID_BITS, KVSpec, LayerSpec, ModelIdentity

__all__ = [
    "FORMAT",
    "VERSION",
    "LAYER_KEYS",
    "BUILTIN_DEFAULTS",
    "KNOWN_MODELS",
    "Manifest",
    "ModelIdentity",
    "MemoryReport",
    "LayerMemory",
    "ManifestError",
    "register_mode_name",
    "mode_names",
    "layer_index",
    "module_name",
    "load",
    "uniform",
    "mixed",
    "from_kvtuner_yaml",
    "memory_report",
]

FORMAT = "kvtuner-jax-manifest"
VERSION = 1
TOP_KEYS = ("format", "version", "model", "defaults", "layers", "metadata")
MODEL_KEYS = ("name", "num_layers", "num_kv_heads", "head_dim")

# Keys allowed in `defaults` and in every `layers` entry, with their built-in values. None group size = head_dim.
BUILTIN_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "k_bits": 16,
        "v_bits": 16,
        "k_mode": "int",
        "v_mode": "int",
        "k_symmetric": False,
        "v_symmetric": False,
        "k_axis": "token",
        "v_axis": "token",
        "k_group_size": None,
        "v_group_size": None,
        "residual_length": 0,
        "rotation": False,
        "scale_dtype": "float16",
    }
)
LAYER_KEYS = tuple(BUILTIN_DEFAULTS)
MAX_CHANNEL_GROUP = 128  # a channel group must fit in one page; pages are at most this many tokens in our kernels

# Storage mode names accepted for k_mode / v_mode: every mode registered in kvtuner_jax.modes ("int", "bf16", "fp8"
# and any registered later; kept in step through modes.on_change), plus names allowed for validation only through
# register_mode_name (no implementation: such a layer is not checked further and cannot be laid out).
_MODE_NAMES: set[str] = set()


def register_mode_name(name: str) -> None:
    """Allows `name` as a value of k_mode / v_mode in manifests without registering an implementation (prefer
    `kvtuner_jax.modes.register_mode`, which also makes the name valid here)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"mode name must be a non-empty string, got {name!r}")
    _MODE_NAMES.add(name)


def mode_names() -> tuple[str, ...]:
    """The storage mode names accepted now, sorted."""
    return tuple(sorted(_MODE_NAMES))


def _mode_changed(name: str, registered: bool) -> None:
    if registered:
        register_mode_name(name)
    else:
        _MODE_NAMES.discard(name)


modes.on_change(_mode_changed)


# Shapes of models we ship presets for, so a KVTuner YAML preset can be loaded without spelling the shape out.
KNOWN_MODELS: tuple[ModelIdentity, ...] = (
    ModelIdentity("SmolLM2-135M-Instruct", 30, 3, 64),
    ModelIdentity("Meta-Llama-3.1-8B-Instruct", 32, 8, 128),
    ModelIdentity("Llama-3.1-8B-Instruct", 32, 8, 128),
    ModelIdentity("Meta-Llama-3-8B-Instruct", 32, 8, 128),
    ModelIdentity("Qwen2.5-7B-Instruct", 28, 4, 128),
)

_MODULE_RE = re.compile(r"^(?:(\d+)|model\.layers\.(\d+)(?:\.self_attn)?)$")


def module_name(i: int) -> str:
    """HuggingFace attention module name of layer i: `model.layers.{i}.self_attn`."""
    return f"model.layers.{i}.self_attn"


def layer_index(key: str) -> int | None:
    """Layer index from "7", "model.layers.7" or "model.layers.7.self_attn"; None when `key` is none of these."""
    m = _MODULE_RE.match(key) if isinstance(key, str) else None
    return None if m is None else int(m.group(1) or m.group(2))


# ----------------------------------------------------------------------------------------------------------------
# Field validation


def _type_name(v: Any) -> str:
    """JSON type of v with its article, for messages ("is a string, expected ...")."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list | tuple):
        return "an array"
    if isinstance(v, Mapping):
        return "an object"
    return f"a {type(v).__name__}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not 1


def _show(v: Any) -> str:
    """A value as JSON would spell it (repr for things JSON cannot hold, e.g. numpy scalars)."""
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def _one_of(values: Sequence[Any]) -> str:
    return ", ".join(json.dumps(v) if isinstance(v, str) else str(v) for v in values)


def _check_field(key: str, v: Any, path: str, file: str | None) -> None:
    """Type and range of one defaults/layers field, in isolation."""

    def bad(msg: str) -> ManifestError:
        return ManifestError(path, msg, file)

    if key.endswith("_bits"):
        if not _is_int(v) or v not in VALID_BITS:
            kind = "" if _is_int(v) else f" ({_type_name(v)}, not an integer)"
            raise bad(f"{_show(v)} is not one of {_one_of(VALID_BITS)}{kind}")
    elif key.endswith("_mode"):
        if not isinstance(v, str) or v not in _MODE_NAMES:
            raise bad(f"{_show(v)} is not one of {_one_of(mode_names())}")
    elif key.endswith("_symmetric") or key == "rotation":
        if not isinstance(v, bool):
            raise bad(f"{_show(v)} is {_type_name(v)}, expected true or false")
    elif key.endswith("_axis"):
        if v not in ("token", "channel"):
            raise bad(f'{_show(v)} is not one of "token", "channel"')
    elif key.endswith("_group_size"):
        if not _is_int(v) or v <= 0:
            raise bad(f"{_show(v)} is not a positive integer")
    elif key == "residual_length":
        if not _is_int(v) or v < 0:
            raise bad(f"{_show(v)} is not a non-negative integer")
    elif key == "scale_dtype":
        if v not in SCALE_DTYPES:
            raise bad(f"{_show(v)} is not one of {_one_of(SCALE_DTYPES)}")
    else:  # pragma: no cover - callers filter unknown keys first
        raise bad("unknown field")


def _check_fields(obj: Any, path: str, file: str | None) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ManifestError(path, f"is {_type_name(obj)}, expected an object", file)
    for key, v in obj.items():
        if key not in BUILTIN_DEFAULTS:
            raise ManifestError(f"{path}.{key}", f"unknown field; expected one of {', '.join(LAYER_KEYS)}", file)
        _check_field(key, v, f"{path}.{key}", file)
    return obj


def _check_model_block(obj: Any, file: str | None) -> ModelIdentity:
    if not isinstance(obj, Mapping):
        raise ManifestError("model", f"is {_type_name(obj)}, expected an object", file)
    for key in obj:
        if key not in MODEL_KEYS:
            raise ManifestError(f"model.{key}", f"unknown field; expected one of {', '.join(MODEL_KEYS)}", file)
    for key in MODEL_KEYS:
        if key not in obj:
            raise ManifestError(f"model.{key}", "missing", file)
    if not isinstance(obj["name"], str) or not obj["name"]:
        raise ManifestError("model.name", f"{_show(obj['name'])} is not a non-empty string", file)
    for key in MODEL_KEYS[1:]:
        if not _is_int(obj[key]) or obj[key] <= 0:
            raise ManifestError(f"model.{key}", f"{_show(obj[key])} is not a positive integer", file)
    return ModelIdentity(obj["name"], obj["num_layers"], obj["num_kv_heads"], obj["head_dim"])


def _normalize_layers(obj: Any, num_layers: int, file: str | None) -> list[Any]:
    """`layers` as a list of num_layers entries, from the list form or the object form keyed by index/module name."""
    if isinstance(obj, list):
        if len(obj) != num_layers:
            raise ManifestError("layers", f"has {len(obj)} entries, model.num_layers is {num_layers}", file)
        return list(obj)
    if not isinstance(obj, Mapping):
        raise ManifestError("layers", f"is {_type_name(obj)}, expected an array or an object", file)
    out: list[Any] = [None] * num_layers
    given: dict[int, str] = {}
    for key, entry in obj.items():
        i = layer_index(key)
        path = f"layers[{json.dumps(key)}]"
        if i is None:
            raise ManifestError(path, 'is not a layer key; expected "0".."N-1" or "model.layers.{i}[.self_attn]"', file)
        if i >= num_layers:
            raise ManifestError(path, f"layer {i} is out of range; model.num_layers is {num_layers}", file)
        if i in given:
            raise ManifestError(path, f"layer {i} is given twice (also as {json.dumps(given[i])})", file)
        given[i] = key
        out[i] = entry
    missing = [i for i in range(num_layers) if i not in given]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        raise ManifestError("layers", f"missing layer(s) {shown}; every layer 0..{num_layers - 1} needs an entry", file)
    return out


def _freeze(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in obj.items()})
    if isinstance(obj, list | tuple):
        return tuple(_freeze(v) for v in obj)
    return obj


def _thaw(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _thaw(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [_thaw(v) for v in obj]
    return obj


def _names_match(manifest_name: str, model_name: str) -> bool:
    """ "*" matches anything; otherwise compare case-insensitively, ignoring an "org/" prefix."""
    if manifest_name == "*":
        return True
    base = lambda s: s.rsplit("/", 1)[-1].lower()
    return base(manifest_name) == base(model_name)


# ----------------------------------------------------------------------------------------------------------------
# The manifest


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A validated manifest. Construct with `Manifest.from_json`, `load`, `uniform`, `mixed` or `from_kvtuner_yaml`.

    model: the model shape it is written for. defaults: the given `defaults` object (None when absent). layers: the
    given per-layer override objects (one per layer). metadata: the given free-form object (None when absent).
    Everything is kept as given (read-only); `layer(i)` resolves built-ins <- defaults <- layers[i].
    """

    model: ModelIdentity
    defaults: Mapping[str, Any] | None
    layers: tuple[Mapping[str, Any], ...]
    metadata: Mapping[str, Any] | None = None
    source: str | None = dataclasses.field(default=None, compare=False, repr=False)
    _specs: tuple[LayerSpec, ...] = dataclasses.field(default=(), init=False, compare=False, repr=False)

    def __post_init__(self):
        f = self.source
        if not isinstance(self.model, ModelIdentity):
            raise ManifestError("model", f"is a {type(self.model).__name__}, expected ModelIdentity", f)
        if self.metadata is not None and not isinstance(self.metadata, Mapping):
            raise ManifestError("metadata", f"is {_type_name(self.metadata)}, expected an object", f)
        defaults = {} if self.defaults is None else _check_fields(self.defaults, "defaults", f)
        if not isinstance(self.layers, list | tuple):
            raise ManifestError("layers", f"is {_type_name(self.layers)}, expected an array", f)
        n = self.model.num_layers
        if len(self.layers) != n:
            raise ManifestError("layers", f"has {len(self.layers)} entries, model.num_layers is {n}", f)
        specs = tuple(
            self._resolve(i, defaults, _check_fields(e, f"layers[{i}]", f)) for i, e in enumerate(self.layers)
        )
        # Keep what was given, read-only (to_json returns fresh mutable copies).
        object.__setattr__(self, "defaults", None if self.defaults is None else _freeze(self.defaults))
        object.__setattr__(self, "layers", _freeze(tuple(self.layers)))
        object.__setattr__(self, "metadata", None if self.metadata is None else _freeze(self.metadata))
        object.__setattr__(self, "_specs", specs)

    def _resolve(self, i: int, defaults: Mapping[str, Any], entry: Mapping[str, Any]) -> LayerSpec:
        r = {**BUILTIN_DEFAULTS, **defaults, **entry}
        d = self.model.head_dim

        def where(key: str) -> str:
            return f"layers[{i}].{key}" if key in entry else f"defaults.{key}" if key in defaults else f"layers[{i}]"

        def level(key: str) -> int:
            return 2 if key in entry else 1 if key in defaults else 0

        def kv(p: str) -> KVSpec:
            g = r[f"{p}_group_size"] if r[f"{p}_group_size"] is not None else d
            bits, name = r[f"{p}_bits"], r[f"{p}_mode"]
            mode = modes.get_mode(name) if modes.is_registered(name) else None
            # A mode named more specifically than the bits brings its own bits (fp8 -> 8, bf16 -> 16), so a layer
            # may say {"k_mode": "fp8"} under integer defaults. Bits 16 always means unquantized.
            if mode is not None and mode.implied_bits is not None and level(f"{p}_bits") < level(f"{p}_mode"):
                bits = mode.implied_bits
            spec = KVSpec(bits, name, r[f"{p}_axis"], g, r[f"{p}_symmetric"], r["scale_dtype"])
            if spec.quantized and mode is not None and mode.name != "int":
                if bits not in mode.valid_bits:
                    allowed = ", ".join(map(str, sorted({*mode.valid_bits, 16})))
                    raise ManifestError(
                        where(f"{p}_bits"),
                        f'{bits} is not valid for {p}_mode "{name}" ({where(f"{p}_mode")}); expected one of {allowed} '
                        "(16 = unquantized)",
                        self.source,
                    )
                spec = mode.canonical(spec, d)
                try:
                    mode.validate(spec, None, d)
                except ValueError as e:
                    raise ManifestError(where(f"{p}_mode"), str(e), self.source) from None
            elif spec.quantized and mode is not None:
                gpath = where(f"{p}_group_size")
                if spec.axis == "token" and d % g:
                    raise ManifestError(gpath, f'{g} does not divide head_dim {d} ({p}_axis "token")', self.source)
                if spec.axis == "channel" and (g & (g - 1) or g > MAX_CHANNEL_GROUP):
                    raise ManifestError(
                        gpath,
                        f'{g} is not a power of two <= {MAX_CHANNEL_GROUP} ({p}_axis "channel" groups tokens '
                        "within one page)",
                        self.source,
                    )
                if spec.axis == "token" and (d * spec.bits) % 8:
                    raise ManifestError(where(f"{p}_bits"), f"head_dim {d} does not pack into bytes", self.source)
            return spec

        return LayerSpec(k=kv("k"), v=kv("v"), residual_length=r["residual_length"], rotation=r["rotation"])

    # -- access ----------------------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    def layer(self, i: int) -> LayerSpec:
        """Resolved spec of layer i (0-based)."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} is out of range 0..{self.num_layers - 1}")
        return self._specs[i]

    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """Resolved specs of all layers, in order."""
        return self._specs

    def layer_bits(self) -> tuple[tuple[int, int], ...]:
        """(K bits, V bits) of every layer."""
        return tuple((s.k.bits, s.v.bits) for s in self._specs)

    def check_model(
        self,
        name: str | None = None,
        num_layers: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
    ) -> None:
        """Raises ManifestError naming the field when the manifest was written for another model shape.

        Only the given arguments are compared. Shapes must match exactly; names match when the manifest's name is
        "*" or the two agree case-insensitively ignoring an "org/" prefix.
        """
        m = self.model
        for key, want in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            have = getattr(m, key)
            if want is not None and want != have:
                raise ManifestError(f"model.{key}", f"manifest has {have}, model has {want}", self.source)
        if name is not None and not _names_match(m.name, name):
            raise ManifestError("model.name", f"manifest has {m.name!r}, model has {name!r}", self.source)

    # -- JSON ------------------------------------------------------------------------------------------------------

    @classmethod
    def from_json(cls, obj: Any, file: str | os.PathLike | None = None) -> Manifest:
        """Validates a parsed JSON object into a Manifest. `file` only labels error messages."""
        f = None if file is None else str(file)
        if not isinstance(obj, Mapping):
            raise ManifestError("$", f"is {_type_name(obj)}, expected a JSON object", f)
        for key in obj:
            if key not in TOP_KEYS:
                raise ManifestError(key, f"unknown field; expected one of {', '.join(TOP_KEYS)}", f)
        for key in ("format", "version", "model", "layers"):
            if key not in obj:
                raise ManifestError(key, "missing", f)
        if obj["format"] != FORMAT:
            raise ManifestError("format", f"{_show(obj['format'])} is not {json.dumps(FORMAT)}", f)
        if not _is_int(obj["version"]) or obj["version"] != VERSION:
            raise ManifestError("version", f"{_show(obj['version'])} is not {VERSION} (the supported version)", f)
        model = _check_model_block(obj["model"], f)
        layers = _normalize_layers(obj["layers"], model.num_layers, f)
        if "metadata" in obj and not isinstance(obj["metadata"], Mapping):
            raise ManifestError("metadata", f"is {_type_name(obj['metadata'])}, expected an object", f)
        if "defaults" in obj and not isinstance(obj["defaults"], Mapping):
            raise ManifestError("defaults", f"is {_type_name(obj['defaults'])}, expected an object", f)
        return cls(
            model=model,
            defaults=copy.deepcopy(obj.get("defaults")),
            layers=tuple(copy.deepcopy(layers)),
            metadata=copy.deepcopy(obj.get("metadata")),
            source=f,
        )

    def to_json(self) -> dict:
        """The canonical JSON object (a fresh, mutable copy); keeps exactly what was given."""
        out: dict[str, Any] = {"format": FORMAT, "version": VERSION, "model": dataclasses.asdict(self.model)}
        if self.defaults is not None:
            out["defaults"] = _thaw(self.defaults)
        out["layers"] = [_thaw(e) for e in self.layers]
        if self.metadata is not None:
            out["metadata"] = _thaw(self.metadata)
        return out

    def dumps(self) -> str:
        """JSON text: indented, one line per layer entry."""
        lines = []
        for key, v in self.to_json().items():
            if key == "layers":
                body = ",\n".join("    " + json.dumps(e) for e in v)
                text = "[\n" + body + "\n  ]" if v else "[]"
            else:
                text = json.dumps(v, indent=2).replace("\n", "\n  ")
            lines.append(f"  {json.dumps(key)}: {text}")
        return "{\n" + ",\n".join(lines) + "\n}\n"

    def save(self, path: str | os.PathLike) -> None:
        """Writes `dumps()` to `path`."""
        Path(path).write_text(self.dumps())

    def __hash__(self) -> int:  # the dict-valued fields are read-only views; hash the canonical text
        return hash(self.dumps())


# ----------------------------------------------------------------------------------------------------------------
# Constructors


def _preset_defaults(
    model: ModelIdentity,
    k_bits: int,
    v_bits: int,
    k_axis: str,
    v_axis: str,
    k_group_size: int | None,
    v_group_size: int | None,
    k_symmetric: bool,
    v_symmetric: bool,
    residual_length: int,
    rotation: bool,
    scale_dtype: str,
) -> dict[str, Any]:
    return {
        "k_bits": k_bits,
        "v_bits": v_bits,
        "k_symmetric": k_symmetric,
        "v_symmetric": v_symmetric,
        "k_axis": k_axis,
        "v_axis": v_axis,
        "k_group_size": model.head_dim if k_group_size is None else k_group_size,
        "v_group_size": model.head_dim if v_group_size is None else v_group_size,
        "residual_length": residual_length,
        "rotation": rotation,
        "scale_dtype": scale_dtype,
    }


def uniform(
    model: ModelIdentity,
    k_bits: int,
    v_bits: int,
    *,
    k_axis: str = "token",
    v_axis: str = "token",
    k_group_size: int | None = None,
    v_group_size: int | None = None,
    k_symmetric: bool = False,
    v_symmetric: bool = False,
    residual_length: int = 0,
    rotation: bool = False,
    scale_dtype: str = "float16",
    metadata: Mapping[str, Any] | None = None,
) -> Manifest:
    """Every layer at (k_bits, v_bits); all settings written out in `defaults`, layers empty. Group size None =
    head_dim."""
    d = _preset_defaults(
        model,
        k_bits,
        v_bits,
        k_axis,
        v_axis,
        k_group_size,
        v_group_size,
        k_symmetric,
        v_symmetric,
        residual_length,
        rotation,
        scale_dtype,
    )
    meta = {"preset": f"uniform k{k_bits} v{v_bits}"} if metadata is None else metadata
    return Manifest(model=model, defaults=d, layers=tuple({} for _ in range(model.num_layers)), metadata=meta)


def mixed(
    model: ModelIdentity,
    bits: Sequence[tuple[int, int]],
    *,
    metadata: Mapping[str, Any] | None = None,
    **settings: Any,
) -> Manifest:
    """Per-layer (K bits, V bits) pairs; `settings` are `uniform`'s keyword options, shared by all layers."""
    base = uniform(model, 16, 16, **settings)
    d = {k: v for k, v in base.to_json()["defaults"].items() if k not in ("k_bits", "v_bits")}
    if len(bits) != model.num_layers:
        raise ManifestError("layers", f"has {len(bits)} entries, model.num_layers is {model.num_layers}")
    layers = tuple({"k_bits": int(k), "v_bits": int(v)} for k, v in bits)
    return Manifest(model=model, defaults=d, layers=layers, metadata=metadata)


def _parse_json_file(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as e:
        raise ManifestError("$", f"cannot read the file: {e.strerror or e}", str(path)) from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError("$", f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", str(path)) from e


def load(path: str | os.PathLike, model: ModelIdentity | None = None, scheme: str | None = None) -> Manifest:
    """Loads a manifest file: our JSON, or a KVTuner YAML preset when the suffix is .yaml/.yml.

    For YAML, `model` gives the shape (else it is looked up by the file name in KNOWN_MODELS) and `scheme`
    ("kivi"/"pertoken") the layout (else inferred from the file name); see `from_kvtuner_yaml`. For JSON, a given
    `model` is checked against the manifest's identity (ManifestError on mismatch).
    """
    p = Path(path)
    if p.suffix.lower() in (".yaml", ".yml"):
        return from_kvtuner_yaml(p, model, scheme)
    m = Manifest.from_json(_parse_json_file(p), file=str(p))
    if model is not None:
        m.check_model(model.name, model.num_layers, model.num_kv_heads, model.head_dim)
    return m


# ----------------------------------------------------------------------------------------------------------------
# KVTuner YAML presets

# What KVTuner's two quantization schemes mean in our terms (DESIGN.md "Numerics contract").
SCHEMES = {
    "kivi": "KIVI: keys per-channel (groups of 32 tokens), values per-token (groups of 32 channels), "
    "asymmetric, residual 32 tokens in full precision",
    "pertoken": "per-token groups of head_dim for keys and values, asymmetric, no residual window",
}
PER_HEAD_RULE = "max over heads, per layer, separately for K and V (no head loses precision)"


def _scheme_settings(scheme: str, head_dim: int) -> dict[str, Any]:
    if scheme == "kivi":
        return dict(k_axis="channel", v_axis="token", k_group_size=32, v_group_size=32, residual_length=32)
    return dict(k_axis="token", v_axis="token", k_group_size=head_dim, v_group_size=head_dim, residual_length=0)


def _infer_model(label: str, num_layers: int, num_heads: int | None, file: str | None) -> ModelIdentity:
    low = label.lower()
    hits = [m for m in KNOWN_MODELS if m.name.lower() in low]
    if not hits:
        known = ", ".join(m.name for m in KNOWN_MODELS)
        raise ManifestError(
            "model",
            f"cannot tell the model shape from the file name {label!r} (known: {known}); pass model=ModelIdentity(...)",
            file,
        )
    m = max(hits, key=lambda m: len(m.name))
    if m.num_layers != num_layers:
        raise ManifestError("model.num_layers", f"{m.name} has {m.num_layers} layers, the file has {num_layers}", file)
    if num_heads is not None and num_heads != m.num_kv_heads:
        raise ManifestError("model.num_kv_heads", f"{m.name} has {m.num_kv_heads} KV heads, the file {num_heads}", file)
    return m


def _yaml_bits(entry: Any, path: str, file: str | None) -> tuple[int, int]:
    if not isinstance(entry, Mapping):
        raise ManifestError(path, f"is {_type_name(entry)}, expected {{nbits_key, nbits_value}}", file)
    for key in entry:
        if key not in ("nbits_key", "nbits_value"):
            raise ManifestError(f"{path}.{key}", "unknown field; expected nbits_key, nbits_value", file)
    out = []
    for key in ("nbits_key", "nbits_value"):
        if key not in entry:
            raise ManifestError(f"{path}.{key}", "missing", file)
        v = entry[key]
        if not _is_int(v) or v not in VALID_BITS:
            raise ManifestError(f"{path}.{key}", f"{v!r} is not one of {_one_of(VALID_BITS)}", file)
        out.append(v)
    return out[0], out[1]


def _yaml_index_keys(obj: Mapping, path: str, file: str | None) -> list[Any]:
    """The mapping's values ordered by their integer keys 0..n-1 (KVTuner writes layer and head indices as keys)."""
    idx = {}
    for key in obj:
        i = key if _is_int(key) else int(key) if isinstance(key, str) and key.isdigit() else None
        if i is None or i < 0:
            raise ManifestError(f"{path}[{key!r}]", "is not a non-negative integer index", file)
        idx[i] = obj[key]
    missing = [i for i in range(len(idx)) if i not in idx]
    if missing:
        raise ManifestError(path or "$", f"indices are not 0..{len(idx) - 1}: missing {missing[0]}", file)
    return [idx[i] for i in range(len(idx))]


def from_kvtuner_yaml(
    path_or_text: str | os.PathLike,
    model: ModelIdentity | None = None,
    scheme: str | None = None,
) -> Manifest:
    """Converts a KVTuner preset (`{layer: {nbits_key, nbits_value}}` YAML, CRLF fine) into a Manifest.

    path_or_text: a file path, or the YAML text itself (then `scheme` must be given, and `model` unless the text
    names no model: it has no name to infer from). model: the shape; None looks the file name up in KNOWN_MODELS and
    takes num_layers from the file. scheme: "kivi" or "pertoken" (SCHEMES); None infers it from the file name.

    Per-head presets (`{layer: {head: {nbits_key, nbits_value}}}`) are reduced to one pair per layer by PER_HEAD_RULE:
    the maximum over heads, separately for K and V, so no head is stored at fewer bits than the preset asked (memory
    is then an upper bound of the per-head preset's). The head count must equal the model's num_kv_heads.
    """
    import yaml  # only this loader needs it

    is_path = isinstance(path_or_text, os.PathLike) or (
        "\n" not in path_or_text and (path_or_text.lower().endswith((".yaml", ".yml")) or Path(path_or_text).exists())
    )
    if is_path:
        p = Path(path_or_text)
        file, label = str(p), p.stem
        try:
            text = p.read_text()
        except OSError as e:
            raise ManifestError("$", f"cannot read the file: {e.strerror or e}", file) from e
    else:
        file, label, text = None, "", str(path_or_text)
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ManifestError("$", f"not valid YAML: {e}", file) from e
    if not isinstance(obj, Mapping) or not obj:
        raise ManifestError(
            "$", f"is {_type_name(obj)}, expected a mapping {{layer: {{nbits_key, nbits_value}}}}", file
        )

    entries = _yaml_index_keys(obj, "", file)
    per_head = all(isinstance(e, Mapping) and e and all(not str(k).startswith("nbits") for k in e) for e in entries)
    heads = None
    bits: list[tuple[int, int]] = []
    if per_head:
        for i, e in enumerate(entries):
            hs = [_yaml_bits(h, f"{i}[{j}]", file) for j, h in enumerate(_yaml_index_keys(e, str(i), file))]
            if heads is not None and len(hs) != heads:
                raise ManifestError(str(i), f"has {len(hs)} heads, layer 0 has {heads}", file)
            heads = len(hs)
            bits.append((max(k for k, _ in hs), max(v for _, v in hs)))
    else:
        bits = [_yaml_bits(e, str(i), file) for i, e in enumerate(entries)]

    if model is None:
        model = _infer_model(label, len(bits), heads, file)
    elif len(bits) != model.num_layers:
        raise ManifestError("layers", f"the file has {len(bits)} layers, model.num_layers is {model.num_layers}", file)
    elif heads is not None and heads != model.num_kv_heads:
        raise ManifestError(
            "model.num_kv_heads",
            f"the file has {heads} heads per layer, model has "
            f"{model.num_kv_heads}; per-head presets must match the KV heads",
            file,
        )

    if scheme is None:
        low = label.lower()
        found = [s for s in SCHEMES if s in low]
        if len(found) != 1:
            raise ManifestError(
                "scheme",
                f"cannot infer the quantization scheme from the file name {label!r}; pass scheme='kivi' or 'pertoken'",
                file,
            )
        scheme = found[0]
    if scheme not in SCHEMES:
        raise ManifestError("scheme", f"{scheme!r} is not one of 'kivi', 'pertoken'", file)

    meta: dict[str, Any] = {
        "source": Path(file).name if file else "<text>",
        "source_format": "KVTuner YAML preset {layer: {nbits_key, nbits_value}}",
        "scheme": scheme,
        "scheme_meaning": SCHEMES[scheme],
    }
    if per_head:
        meta["per_head_reduction"] = PER_HEAD_RULE
    m = mixed(model, bits, metadata=meta, **_scheme_settings(scheme, model.head_dim))
    return dataclasses.replace(m, source=file)


# ----------------------------------------------------------------------------------------------------------------
# Memory arithmetic


@dataclasses.dataclass(frozen=True)
class LayerMemory:
    """Byte costs of one layer's KV cache, all KV heads. Fractions are exact (channel groups amortise over tokens).

    k_bytes_per_token / v_bytes_per_token: in quantized pages (codes + scales + zeros).
    full_bytes_per_token: K + V of one token in the full-precision tail (cache dtype).
    page_bytes: bytes of one physical page of K + V (None without a page size).
    """

    index: int
    spec: LayerSpec
    k_bytes_per_token: Fraction
    v_bytes_per_token: Fraction
    full_bytes_per_token: int
    page_bytes: int | None

    @property
    def bytes_per_token(self) -> Fraction:
        return self.k_bytes_per_token + self.v_bytes_per_token

    def quantized_tokens(self, n_tokens: int, page_size: int) -> int:
        """Q(n) = max(0, floor((n - R) / P)) * P: tokens of an n-token sequence held in quantized pages."""
        return max(0, (n_tokens - self.spec.residual_length) // page_size) * page_size


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """What a manifest costs on its model. All figures cover every layer, K and V, and all KV heads.

    bytes_per_token: asymptotic bytes per token (everything quantized). effective_bits: the same per element, in bits,
    scales/zeros included. avg_nominal_bits: the mean of the manifest's K and V bit widths (16 for unquantized).
    ratio_vs_bf16: bytes_per_token / the bf16 cache's bytes per token (smaller is better).
    """

    model: ModelIdentity
    layers: tuple[LayerMemory, ...]
    page_size: int | None
    cache_dtype_bytes: int

    @property
    def elements_per_token(self) -> int:
        return 2 * self.model.num_layers * self.model.num_kv_heads * self.model.head_dim

    @property
    def bytes_per_token(self) -> Fraction:
        return sum((lm.bytes_per_token for lm in self.layers), Fraction(0))

    @property
    def bf16_bytes_per_token(self) -> int:
        return 2 * self.elements_per_token

    @property
    def avg_nominal_bits(self) -> float:
        return sum(lm.spec.k.bits + lm.spec.v.bits for lm in self.layers) / (2 * len(self.layers))

    @property
    def effective_bits(self) -> float:
        return float(self.bytes_per_token * 8 / self.elements_per_token)

    @property
    def ratio_vs_bf16(self) -> float:
        return float(self.bytes_per_token / self.bf16_bytes_per_token)

    @property
    def page_bytes(self) -> int | None:
        """Bytes of one page index across all layers (what the allocator divides the budget by)."""
        return None if self.page_size is None else sum(lm.page_bytes for lm in self.layers)

    def kv_bytes(self, n_tokens: int) -> int:
        """Bytes of the KV cache of one sequence of n_tokens.

        With a page size: per layer, the first Q(n) tokens cost quantized-page bytes and the remaining n - Q(n) the
        full-precision tail's (DESIGN.md residual window), exactly. Without one: n * bytes_per_token, rounded up.
        """
        if not _is_int(n_tokens) or n_tokens < 0:
            raise ValueError(f"n_tokens={n_tokens!r} is not a non-negative integer")
        if self.page_size is None:
            return math.ceil(n_tokens * self.bytes_per_token)
        total = 0
        for lm in self.layers:
            q = lm.quantized_tokens(n_tokens, self.page_size)
            total += (q // self.page_size) * lm.page_bytes + (n_tokens - q) * lm.full_bytes_per_token
        return total

    def bf16_kv_bytes(self, n_tokens: int) -> int:
        return n_tokens * self.bf16_bytes_per_token


def memory_report(manifest: Manifest, page_size: int | None = None, cache_dtype_bytes: int = 2) -> MemoryReport:
    """Byte arithmetic of `manifest` on its model (see MemoryReport). With `page_size`, channel-axis group sizes are
    checked against it (G must divide P, and P codes must pack into whole bytes)."""
    m = manifest.model
    if page_size is not None and (not _is_int(page_size) or page_size <= 0):
        raise ValueError(f"page_size={page_size!r} is not a positive integer")
    rows = []
    for i, spec in enumerate(manifest.layer_specs()):
        page_bytes = None
        if page_size is not None:
            for p, s in (("k", spec.k), ("v", spec.v)):
                if s.quantized and s.mode != "int":
                    try:
                        modes.mode_of(s).validate(s, page_size, m.head_dim)
                    except ValueError as e:
                        raise ManifestError(f"layers[{i}].{p}_mode", str(e), manifest.source) from None
                elif s.quantized and s.axis == "channel" and (page_size % s.group_size or (page_size * s.bits) % 8):
                    raise ManifestError(
                        f"layers[{i}].{p}_group_size",
                        f"{s.group_size} does not divide page_size {page_size} into whole-byte groups ({p}_axis "
                        '"channel")',
                        manifest.source,
                    )
        kb = spec.k.bytes_per_token(m.num_kv_heads, m.head_dim, cache_dtype_bytes)
        vb = spec.v.bytes_per_token(m.num_kv_heads, m.head_dim, cache_dtype_bytes)
        if page_size is not None:
            page = (kb + vb) * page_size
            assert page.denominator == 1, (i, page)  # G divides P, so a page holds whole groups
            page_bytes = int(page)
        full = 2 * m.num_kv_heads * m.head_dim * cache_dtype_bytes
        rows.append(LayerMemory(i, spec, kb, vb, full, page_bytes))
    return MemoryReport(model=m, layers=tuple(rows), page_size=page_size, cache_dtype_bytes=cache_dtype_bytes)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _store(s: KVSpec) -> str:
    if not s.quantized:
        return "16 (bf16)"
    if s.mode != "int" and modes.is_registered(s.mode):
        return modes.mode_of(s).describe(s)
    sym = "sym" if s.symmetric else "asym"
    mode = "" if s.mode == "int" else f" {s.mode}"
    return f"{s.bits}{mode} {s.axis} G{s.group_size} {sym}"


def describe(manifest: Manifest, tokens: int | None = None, page_size: int | None = None, console=None) -> None:
    """Prints the per-layer table and the totals of `memory_report` with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 120)  # piped: do not squeeze to 80
    rep = memory_report(manifest, page_size=page_size)
    m = manifest.model
    title = f"{m.name}: {m.num_layers} layers, {m.num_kv_heads} KV heads, head_dim {m.head_dim}"
    table = Table(title=title)
    for col in ("layer", "K", "V", "R", "rot", "K B/tok", "V B/tok", "eff bits"):
        table.add_column(col, justify="left" if col in ("K", "V") else "right", no_wrap=True)
    per_layer_elems = 2 * m.num_kv_heads * m.head_dim
    for lm in rep.layers:
        s = lm.spec
        table.add_row(
            str(lm.index),
            _store(s.k),
            _store(s.v),
            str(s.residual_length),
            "yes" if s.rotation else "",
            f"{float(lm.k_bytes_per_token):g}",
            f"{float(lm.v_bytes_per_token):g}",
            f"{float(lm.bytes_per_token * 8 / per_layer_elems):.3f}",
        )
    console.print(table)
    if manifest.source:
        console.print(f"file: {manifest.source}")
    console.print(f"average nominal bits: {rep.avg_nominal_bits:.4g}")
    console.print(f"effective bits (incl. scales/zeros): {rep.effective_bits:.4g}")
    console.print(
        f"bytes per token (all layers, K+V): {float(rep.bytes_per_token):g} (bf16: {rep.bf16_bytes_per_token})"
    )
    console.print(f"ratio vs bf16: {rep.ratio_vs_bf16:.4f} ({1 / rep.ratio_vs_bf16:.2f}x smaller)")
    if page_size is not None:
        console.print(f"bytes per page index (page_size {page_size}, all layers): {rep.page_bytes}")
    if tokens is not None:
        how = f"page_size {page_size}, residual tails exact" if page_size else "asymptotic, no page size"
        kv, bf = rep.kv_bytes(tokens), rep.bf16_kv_bytes(tokens)
        console.print(
            f"KV bytes for {tokens} tokens ({how}): {kv} ({_fmt_bytes(kv)}); bf16: {bf} ({_fmt_bytes(bf)}); "
            f"ratio {kv / bf if bf else float('nan'):.4f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtuner_jax.manifest", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("describe", help="print the per-layer table and memory totals of a manifest (JSON or YAML)")
    d.add_argument("file")
    d.add_argument("--tokens", type=int, default=None, help="also report KV bytes of one sequence of N tokens")
    d.add_argument("--page_size", type=int, default=None, help="page size P (exact residual tails, page bytes)")
    d.add_argument("--scheme", choices=sorted(SCHEMES), default=None, help="for KVTuner YAML presets")
    args = parser.parse_args(argv)
    try:
        m = load(args.file, scheme=args.scheme)
        describe(m, tokens=args.tokens, page_size=args.page_size)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
