"""Library side of `run_inference.py`: a frozen config in, generations and a memory report out.

Everything the command line does is importable from here; the script only maps absl flags onto `InferenceConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from kvtuner_jax import cache as kc
from kvtuner_jax import manifest as mf
from kvtuner_jax.errors import KVTunerError, ManifestError
from kvtuner_jax.runtime import ModelRunner, bucket, generate
from kvtuner_jax.sampling import SamplingParams

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MANIFEST = REPO / "configs" / "smollm2_k8v4.json"
DEFAULT_PROMPT = "The most important thing to know about startups is"


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    model: str | None = None  # None: the embedded SmolLM2
    manifest: str | None = None  # None: DEFAULT_MANIFEST; "none": every layer 16-bit
    prompts: tuple[str, ...] = ()
    prompts_file: str | None = None
    chat: bool = False
    sampling: SamplingParams = SamplingParams()
    page_size: int = 32
    num_pages: int | None = None
    kv_cache_gb: float | None = None
    max_seqs: int | None = None
    backend: str = "auto"
    dtype: str | None = None  # params/activations; None: float32 on CPU, bfloat16 on accelerators


def read_prompts(cfg: InferenceConfig) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise KVTunerError(f"--prompts_file {path} does not exist")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise KVTunerError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(obj, str):
                prompts.append(obj)
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                prompts.append(obj["prompt"])
            else:
                raise KVTunerError(f'{path}:{n}: expected a JSON string or an object with a "prompt" string')
    return prompts or [DEFAULT_PROMPT]


def load_manifest(spec: str | None, model_cfg) -> mf.Manifest:
    """The manifest file (or "none" = all 16-bit), checked against the model it will run on."""
    ident = mf.ModelIdentity(
        name=model_cfg.name,
        num_layers=model_cfg.num_layers,
        num_kv_heads=model_cfg.num_kv_heads,
        head_dim=model_cfg.head_dim,
    )
    if spec is not None and spec.lower() == "none":
        return mf.uniform(ident, 16, 16)
    path = Path(spec) if spec else DEFAULT_MANIFEST
    if not path.is_file():
        raise ManifestError("manifest", f"file {path} does not exist")
    m = mf.load(path, model=ident)
    m.check_model(
        name=model_cfg.name,
        num_layers=model_cfg.num_layers,
        num_kv_heads=model_cfg.num_kv_heads,
        head_dim=model_cfg.head_dim,
    )
    return m


def build_runner(model_cfg, params, manifest: mf.Manifest, cfg: InferenceConfig, max_tokens_per_seq: int, seqs: int):
    specs = manifest.layer_specs()
    probe = kc.CacheConfig(model_cfg.num_layers, model_cfg.num_kv_heads, model_cfg.head_dim, cfg.page_size, 1, seqs)
    probe = dataclasses.replace(probe, dtype=_cache_dtype(model_cfg))
    if cfg.num_pages is not None:
        num_pages = cfg.num_pages
    elif cfg.kv_cache_gb is not None:
        num_pages = kc.pages_for_budget(specs, probe, int(cfg.kv_cache_gb * 2**30))
    else:
        min_r = min(s.residual_length for s in specs)
        num_pages = seqs * max(1, (max_tokens_per_seq - min_r) // cfg.page_size)
    cache_cfg = dataclasses.replace(probe, num_pages=num_pages)
    return ModelRunner(model_cfg, params, specs, cache_cfg, backend=cfg.backend)


def _cache_dtype(model_cfg) -> str:
    # 16-bit layers and tails: bf16 when the model runs in bf16; float32 models keep a float32 tail (exact eval)
    return "bfloat16" if model_cfg.dtype == "bfloat16" else "float32"


def memory_lines(manifest: mf.Manifest, runner: ModelRunner) -> list[str]:
    rep = mf.memory_report(manifest, page_size=runner.page_size)
    cc = runner.cache_cfg
    page_bytes = sum(kc.layer_bytes_per_page(s, cc) for s in runner.specs)
    return [
        f"KV cache: {rep.bytes_per_token:.0f} bytes/token over {manifest.num_layers} layers "
        f"(bf16 would be {rep.bf16_bytes_per_token:.0f}), effective {rep.effective_bits:.2f} bits/element "
        f"(nominal {rep.avg_nominal_bits:.2f}), {1 / rep.ratio_vs_bf16:.2f}x smaller than bf16",
        f"pool: {cc.num_pages} pages x {cc.page_size} tokens = {cc.num_pages * page_bytes / 2**20:.1f} MiB, "
        f"tails {kc.tail_bytes(runner.specs, cc) / 2**20:.1f} MiB for {cc.max_seqs} sequences",
    ]


def run(cfg: InferenceConfig, out=sys.stdout) -> list[str]:
    """Loads the model and manifest, generates for every prompt, prints generations and the memory report."""
    import jax

    from kvtuner_jax.weights import load_model

    dtype = cfg.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    t0 = time.perf_counter()
    model_cfg, params, tok = load_model(cfg.model, dtype=dtype)
    if tok is None:
        raise KVTunerError(f"model {cfg.model} has no tokenizer (expected tokenizer.json beside an HF model)")
    manifest = load_manifest(cfg.manifest, model_cfg)
    texts = read_prompts(cfg)
    prompts = []
    for text in texts:
        if cfg.chat:
            prompts.append(tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_bos=False))
        else:
            prompts.append(tok.encode(text))
    longest = max(len(p) for p in prompts) + cfg.sampling.max_new_tokens
    runner = build_runner(model_cfg, params, manifest, cfg, bucket(longest), cfg.max_seqs or len(prompts))
    print(
        f"model {model_cfg.name} ({model_cfg.num_layers} layers, {dtype}) loaded in {time.perf_counter() - t0:.1f} s;"
        f" manifest {cfg.manifest or DEFAULT_MANIFEST}; backend {cfg.backend}",
        file=out,
    )
    for line in memory_lines(manifest, runner):
        print(line, file=out)
    t1 = time.perf_counter()
    outs = generate(runner, prompts, cfg.sampling, eos_ids=model_cfg.eos_token_ids)
    dt = time.perf_counter() - t1
    texts_out = [tok.decode(o, skip_special_tokens=True) for o in outs]
    for text, gen in zip(texts, texts_out, strict=True):
        print(f"\n>>> {text}\n{gen}", file=out)
    n = sum(len(o) for o in outs)
    print(f"\n{n} tokens in {dt:.1f} s (incl. compilation), {n / max(dt, 1e-9):.1f} tokens/s", file=out)
    return texts_out


def main_guard(fn):
    """Runs fn(); our own errors print one clear line and exit 2 instead of a traceback."""
    try:
        return fn()
    except KVTunerError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
