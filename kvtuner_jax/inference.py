"""Library side of `run_inference.py` (and the manifest/KV flags the eval job shares): a frozen config in,
generations, the memory plan and engine telemetry out.

Everything the command line does is importable from here; the scripts only map absl flags onto `InferenceConfig`.

Which KV manifest runs (first match wins):
1. `--manifest=none`: every layer 16-bit.   2. `--manifest=PATH`: that file (JSON, or a KVTuner YAML preset).
3. Serving-style flags (`--kv_nbits_key` ...): a uniform manifest built by `manifest.uniform` (an error with 2.).
4. A `kvtuner_manifest.json` beside the checkpoint (in the HF or Orbax directory given as --model; write one with
   `save_manifest_beside`); the log says so.   5. DEFAULT_MANIFEST (configs/smollm2_k8v4.json).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

from kvtuner_jax import manifest as mf
from kvtuner_jax.errors import KVTunerError, ManifestError
from kvtuner_jax.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MANIFEST = REPO / "configs" / "smollm2_k8v4.json"
DEFAULT_PROMPT = "The most important thing to know about startups is"
MANIFEST_BESIDE = "kvtuner_manifest.json"


@dataclasses.dataclass(frozen=True)
class KVFlags:
    """Serving-style KV settings (one uniform manifest for all layers), as vLLM/KIVI-style flags give them.

    nbits: 2, 4, 8 or 16. asym: asymmetric (scale + zero-point) codes. axis: "token" or "channel". group_size: None =
    head_dim. mode: storage mode name (manifest.mode_names()).
    """

    nbits_key: int = 16
    nbits_value: int = 16
    asym: bool = True
    axis_key: str = "token"
    axis_value: str = "token"
    group_size: int | None = None
    residual_length: int = 0
    mode: str = "int"

    def manifest(self, ident: mf.ModelIdentity) -> mf.Manifest:
        m = mf.uniform(
            ident,
            self.nbits_key,
            self.nbits_value,
            k_axis=self.axis_key,
            v_axis=self.axis_value,
            k_group_size=self.group_size,
            v_group_size=self.group_size,
            k_symmetric=not self.asym,
            v_symmetric=not self.asym,
            residual_length=self.residual_length,
            metadata={"preset": "serving flags", "flags": dataclasses.asdict(self)},
        )
        if self.mode != "int":  # uniform() has no mode argument; the manifest validates the name
            obj = m.to_json()
            obj["defaults"].update(k_mode=self.mode, v_mode=self.mode)
            m = mf.Manifest.from_json(obj)
        return m

    def describe(self) -> str:
        g = "head_dim" if self.group_size is None else self.group_size
        return (
            f"uniform K{self.nbits_key}/V{self.nbits_value} ({'asym' if self.asym else 'sym'}, K axis {self.axis_key}, "
            f"V axis {self.axis_value}, group {g}, residual {self.residual_length}, mode {self.mode})"
        )


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    model: str | None = None  # None: the embedded SmolLM2
    manifest: str | None = None  # see the module docstring; "none": every layer 16-bit
    kv: KVFlags | None = None  # serving-style flags; None when none was given
    prompts: tuple[str, ...] = ()
    prompts_file: str | None = None
    chat: bool = False
    sampling: SamplingParams = SamplingParams()
    page_size: int = 32
    num_pages: int | None = None
    kv_cache_gb: float | None = None
    max_seqs: int | None = None
    prefill_chunk: int = 256
    backend: str = "auto"
    attention_precision: str = "auto"  # "auto", "high" or "bf16" (see pallas_kernels.paged_attention)
    dtype: str | None = None  # params/activations; None: float32 on CPU, bfloat16 on accelerators


def read_prompts(cfg: InferenceConfig) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        from kvtuner_jax.assets import read_jsonl_strings

        if not Path(cfg.prompts_file).is_file():
            raise KVTunerError(f"--prompts_file {cfg.prompts_file} does not exist")
        prompts += read_jsonl_strings(cfg.prompts_file, "prompt")
    return prompts or [DEFAULT_PROMPT]


# ---------------------------------------------------------------------------------------------------------------
# Manifests: files, flags, beside the checkpoint.


def model_identity(model_cfg) -> mf.ModelIdentity:
    return mf.ModelIdentity(
        name=model_cfg.name,
        num_layers=model_cfg.num_layers,
        num_kv_heads=model_cfg.num_kv_heads,
        head_dim=model_cfg.head_dim,
    )


def save_manifest_beside(directory: str | os.PathLike, manifest: mf.Manifest) -> Path:
    """Stores `manifest` as <directory>/kvtuner_manifest.json (an HF or Orbax model directory), so that
    `run_inference.py --model=<directory>` and the eval job use it when no manifest is given."""
    d = Path(directory)
    if not d.is_dir():
        raise KVTunerError(f"{d} is not a directory (expected the HF or Orbax model directory)")
    path = d / MANIFEST_BESIDE
    manifest.save(path)
    return path


def manifest_beside(model: str | os.PathLike | None) -> Path | None:
    """<model dir>/kvtuner_manifest.json when --model is a directory holding one, else None."""
    if model is None:
        return None
    p = Path(model) / MANIFEST_BESIDE
    return p if p.is_file() else None


def load_manifest_file(path: str | os.PathLike, model_cfg) -> mf.Manifest:
    """A manifest file checked against the model it will run on (ManifestError naming the field otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError("manifest", f"file {path} does not exist")
    ident = model_identity(model_cfg)
    m = mf.load(path, model=ident if path.suffix.lower() in (".yaml", ".yml") else None)
    m.check_model(
        name=model_cfg.name,
        num_layers=model_cfg.num_layers,
        num_kv_heads=model_cfg.num_kv_heads,
        head_dim=model_cfg.head_dim,
    )
    return m


def resolve_manifest(
    spec: str | None, kv: KVFlags | None, model_cfg, model_path: str | None = None
) -> tuple[mf.Manifest, str]:
    """The manifest to run (see the module docstring for the order) and a phrase saying where it came from."""
    if spec is not None and kv is not None:
        raise KVTunerError("--manifest cannot be combined with the --kv_* flags (they build a uniform manifest)")
    ident = model_identity(model_cfg)
    if spec is not None and spec.lower() == "none":
        return mf.uniform(ident, 16, 16), "none (every layer 16-bit)"
    if spec is not None:
        return load_manifest_file(spec, model_cfg), str(spec)
    if kv is not None:
        try:
            return kv.manifest(ident), kv.describe()
        except ValueError as e:  # ManifestError is one; uniform's own checks too
            raise KVTunerError(f"--kv_* flags: {e}") from None
    beside = manifest_beside(model_path)
    if beside is not None:
        return load_manifest_file(beside, model_cfg), f"{beside} (found beside the checkpoint)"
    return load_manifest_file(DEFAULT_MANIFEST, model_cfg), f"{DEFAULT_MANIFEST} (default)"


# ---------------------------------------------------------------------------------------------------------------
# Running


def build_engine(
    model_cfg, params, manifest: mf.Manifest, cfg: InferenceConfig, max_seq_len: int, seqs: int, mesh=None
):
    """An Engine sized for `seqs` sequences of up to max_seq_len tokens (or the --num_pages / --kv_cache_gb pool)."""
    from kvtuner_jax.engine import Engine

    if cfg.num_pages is not None and cfg.kv_cache_gb is not None:
        raise KVTunerError("give at most one of --num_pages and --kv_cache_gb")
    return Engine(
        model_cfg,
        params,
        manifest,
        mesh,
        max_seqs=seqs,
        max_seq_len=max_seq_len,
        page_size=cfg.page_size,
        num_pages=cfg.num_pages,
        kv_cache_gb=cfg.kv_cache_gb,
        prefill_chunk=cfg.prefill_chunk,
        backend=cfg.backend,
        precision=cfg.attention_precision,
    )


def run(cfg: InferenceConfig, out=sys.stdout, mesh=None) -> list[str]:
    """Loads the model and manifest, generates for every prompt, prints generations, the memory plan and stats.

    mesh: a ("data", "model") mesh (`sharding.mesh_from_flags`); the slot count is rounded up to a multiple of its
    data axis."""
    import jax

    from kvtuner_jax.runtime import bucket
    from kvtuner_jax.weights import load_model

    if cfg.manifest is not None and cfg.kv is not None:  # fail before loading anything
        raise KVTunerError("--manifest cannot be combined with the --kv_* flags (they build a uniform manifest)")
    dtype = cfg.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    t0 = time.perf_counter()
    model_cfg, params, tok = load_model(cfg.model, dtype=dtype)
    if tok is None:
        raise KVTunerError(f"model {cfg.model} has no tokenizer (expected tokenizer.json beside an HF model)")
    manifest, source = resolve_manifest(cfg.manifest, cfg.kv, model_cfg, cfg.model)
    texts = read_prompts(cfg)
    prompts = []
    for text in texts:
        if cfg.chat:
            prompts.append(tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_bos=False))
        else:
            prompts.append(tok.encode(text))
    longest = max(len(p) for p in prompts) + cfg.sampling.max_new_tokens
    limit = model_cfg.max_position_embeddings
    if longest > limit:
        i = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        raise KVTunerError(
            f"prompt {i} has {len(prompts[i])} tokens; with max_new_tokens={cfg.sampling.max_new_tokens} that is "
            f"{longest} tokens, longer than the model's context of {limit}"
        )
    max_seq_len = min(limit, max(bucket(longest), cfg.page_size))
    seqs = cfg.max_seqs or len(prompts)
    if mesh is not None:
        data = int(mesh.shape["data"])
        seqs = -(-seqs // data) * data
    engine = build_engine(model_cfg, params, manifest, cfg, max_seq_len, seqs, mesh)
    print(
        f"model {model_cfg.name} ({model_cfg.num_layers} layers, {dtype}) loaded in {time.perf_counter() - t0:.1f} s;"
        f" manifest {source}; backend {cfg.backend}" + ("" if mesh is None else f"; mesh {dict(mesh.shape)}"),
        file=out,
    )
    for line in memory_lines(manifest, engine):
        print(line, file=out)
    print(precision_line(engine.specs, cfg.attention_precision, cfg.backend), file=out)
    kernels = kernel_line(
        engine.specs, heads=model_cfg.num_heads, kv_heads=model_cfg.num_kv_heads, head_dim=model_cfg.head_dim,
        page_size=engine.page_size, backend=cfg.backend,
    )  # fmt: skip
    if kernels:
        print(kernels, file=out)
    t1 = time.perf_counter()
    outs = engine.generate(prompts, cfg.sampling)
    dt = time.perf_counter() - t1
    texts_out = [tok.decode(o, skip_special_tokens=True) for o in outs]
    for text, gen in zip(texts, texts_out, strict=True):
        print(f"\n>>> {text}\n{gen}", file=out)
    n = sum(len(o) for o in outs)
    print(f"\n{n} tokens in {dt:.1f} s (incl. compilation), {n / max(dt, 1e-9):.1f} tokens/s", file=out)
    print(engine.stats_line(), file=out)
    return texts_out


def memory_lines(manifest: mf.Manifest, engine) -> list[str]:
    """The manifest's per-token arithmetic and the planner's pool (printed at start-up)."""
    rep = mf.memory_report(manifest, page_size=engine.page_size)
    return [
        f"KV cache: {rep.bytes_per_token:.0f} bytes/token over {manifest.num_layers} layers "
        f"(bf16 would be {rep.bf16_bytes_per_token:.0f}), effective {rep.effective_bits:.2f} bits/element "
        f"(nominal {rep.avg_nominal_bits:.2f}), {1 / rep.ratio_vs_bf16:.2f}x smaller than bf16",
        *engine.plan.lines(),
    ]


def precision_line(specs, precision: str, backend: str) -> str:
    """How each layer's paged attention will compute, e.g. "attention precision auto: bf16 in 20 layers, high in
    12" (`pallas_kernels.paged_attention.resolve_precision`, per layer; printed at start-up)."""
    import collections

    from pallas_kernels.paged_attention import resolve_backend, resolve_precision

    where = resolve_backend(backend)
    if where == "reference":
        return f"attention precision {precision}: not used here (no kernel on this backend; the float32 reference runs)"
    if where == "tpu":
        return f"attention precision {precision}: not used here (the TPU kernel computes in float32)"
    counts = collections.Counter(resolve_precision(precision, s.k, s.v) for s in specs)
    return f"attention precision {precision}: " + ", ".join(
        f"{p} in {n} layer{'' if n == 1 else 's'}" for p, n in sorted(counts.items())
    )


def kernel_line(specs, *, heads: int, kv_heads: int, head_dim: int, page_size: int, backend: str, capability=None):
    """Which GPU kernel each layer's decode attention runs (`pallas_kernels.paged_attention_gpu.mosaic_route`; the
    reference where neither storage mode offers a GPU kernel), e.g. "decode attention kernels: Mosaic GPU in 4
    layers, Triton in 28 layers", and, where the page size keeps every per-token layer off the faster Mosaic GPU
    kernel, the page size that would not; None off a GPU backend. `capability` overrides the device's
    compute capability (tests). Printed at start-up."""
    import collections

    import jax
    import jax.numpy as jnp

    from pallas_kernels import layout
    from pallas_kernels.paged_attention import kernel_for, resolve_backend
    from pallas_kernels.paged_attention_gpu import mosaic_route
    from pallas_kernels.paged_attention_mgpu import BLOCK_PAGES
    from pallas_kernels.paged_attention_mgpu import PAGE as mgpu_page
    from pallas_kernels.paged_attention_mgpu import PAGES as mgpu_pages

    if resolve_backend(backend) != "gpu":
        return None

    def kind(spec):
        if kernel_for("gpu", spec.k, spec.v) is None:
            return "the reference"
        if "int_block" in (spec.k.mode, spec.v.mode):  # only the Mosaic GPU kernel reads blocks, on Hopper
            return "Mosaic GPU" if blocks_read(spec) else "the reference"
        return "Mosaic GPU" if mosaic(spec, page_size) else "Triton"

    def sds(x):
        return None if x is None else jax.ShapeDtypeStruct(x.shape, jnp.dtype(x.dtype))

    def blocks_read(spec, page=page_size):
        from pallas_kernels.paged_attention_mgpu import gpu_capability, unsupported

        cap = gpu_capability() if capability is None else capability
        k, v = (layout.arrays(x, kv_heads, 1, page, head_dim) for x in (spec.k, spec.v))
        q = jax.ShapeDtypeStruct((1, heads, 1, head_dim), jnp.bfloat16)
        ok = unsupported(q, sds(k.codes), sds(v.codes), k_spec=spec.k, v_spec=spec.v) is None
        return ok and str(cap or "").startswith("9.")

    def mosaic(spec, page):
        k, v = (layout.arrays(x, kv_heads, 1, page, head_dim) for x in (spec.k, spec.v))
        q = jax.ShapeDtypeStruct((1, heads, 1, head_dim), jnp.bfloat16)
        return mosaic_route(
            q, sds(k.codes), sds(v.codes), sds(v.scale), k_spec=spec.k, v_spec=spec.v, interpret=False,
            capability=capability,
        )  # fmt: skip

    counts = collections.Counter(kind(s) for s in specs)
    line = "decode attention kernels: " + ", ".join(
        f"{k} in {n} layer{'' if n == 1 else 's'}" for k, n in sorted(counts.items())
    )
    if page_size not in BLOCK_PAGES and any(
        "int_block" in (x.k.mode, x.v.mode) and kernel_for("gpu", x.k, x.v) and blocks_read(x, BLOCK_PAGES[0])
        for x in specs
    ):
        line += f"; mode int_block layers run the Mosaic GPU kernel at --page_size {BLOCK_PAGES[0]}"
    if page_size not in mgpu_pages and not counts["Mosaic GPU"]:
        n = sum(mosaic(s, mgpu_page) for s in specs)
        if n:
            line += (
                f"; with --page_size {mgpu_page} {n} per-token layer{'' if n == 1 else 's'} would run the Mosaic GPU "
                "kernel (decode attention 1.2-1.5x faster on an H100, BENCHMARKS.md)"
            )
    return line


def main_guard(fn):
    """Runs fn(); our own errors print one clear line and exit 2 instead of a traceback."""
    try:
        return fn()
    except KVTunerError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------------------------
# absl flags shared by run_inference.py and the eval job.

KV_FLAG_NAMES = (
    "kv_nbits_key",
    "kv_nbits_value",
    "kv_asym",
    "kv_axis_key",
    "kv_axis_value",
    "kv_group_size",
    "kv_residual_length",
    "kv_mode",
)


def define_kv_flags() -> None:
    """Defines the serving-style --kv_* flags (call once, at import of an entry point)."""
    from absl import flags

    flags.DEFINE_enum("kv_nbits_key", None, ["2", "4", "8", "16"], "Uniform K bits for every layer (no manifest).")
    flags.DEFINE_enum("kv_nbits_value", None, ["2", "4", "8", "16"], "Uniform V bits for every layer.")
    flags.DEFINE_bool("kv_asym", True, "Asymmetric codes (scale + zero-point); --nokv_asym: symmetric.")
    flags.DEFINE_enum("kv_axis_key", "token", ["token", "channel"], "K quantization groups: per token or channel.")
    flags.DEFINE_enum("kv_axis_value", "token", ["token", "channel"], "V quantization groups.")
    flags.DEFINE_integer("kv_group_size", None, "Quantization group size (default head_dim).")
    flags.DEFINE_integer("kv_residual_length", 0, "Most recent tokens kept in full precision (residual window).")
    flags.DEFINE_string("kv_mode", "int", "Storage mode name (see kvtuner_jax.manifest.mode_names()).")


def kv_flags_from(FLAGS) -> KVFlags | None:
    """KVFlags when any --kv_* flag was given on the command line, else None. Unset bit widths are 16."""
    if not any(FLAGS[name].present for name in KV_FLAG_NAMES):
        return None
    return KVFlags(
        nbits_key=int(FLAGS.kv_nbits_key or 16),
        nbits_value=int(FLAGS.kv_nbits_value or 16),
        asym=FLAGS.kv_asym,
        axis_key=FLAGS.kv_axis_key,
        axis_value=FLAGS.kv_axis_value,
        group_size=FLAGS.kv_group_size,
        residual_length=FLAGS.kv_residual_length,
        mode=FLAGS.kv_mode,
    )
