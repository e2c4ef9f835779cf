"""Model loading: GGUF (dequantized), HF safetensors directories, and our Orbax checkpoints.

`load_model(spec)` is the entry point: None (the embedded SmolLM2-135M-Instruct GGUF), a .gguf path, a HF directory
(config.json + *.safetensors + tokenizer.json) or an Orbax directory written by `save_orbax`. A GGUF is converted to
an Orbax checkpoint under $KVTUNER_CACHE_DIR (default ~/.cache/kvtuner-jax) the first time and restored from there
afterwards.

Measured on the 2-core CPU box (2026-11-22, JAX_PLATFORMS=cpu), SmolLM2-135M Q4_1 (98 MB GGUF, 135M params):
  `load_gguf` (GGUFReader + dequantize + un-permute + tokenizer + to float32 jax arrays): 5.2 s
  (GGUFReader alone ~2.8 s, dequantize ~1.5 s); `save_orbax` 2.9 s once; `load_orbax` (float32): 2.0 s.

GGUF's Q/K rows: llama.cpp's convert_hf_to_gguf.py permutes the rows of attn_q/attn_k per head so that its RoPE can
rotate adjacent pairs (2i, 2i+1): HF rows viewed as [heads, 2, hd/2] are stored as [heads, hd/2, 2]. We undo it
(`unpermute_qk`), so our RoPE is HF's rotate_half over (i, i + hd/2). Proven by perplexity (tests/test_weights.py):
float32, first 1024 tokens of the first essay: un-permuted perplexity 25.7, llama.cpp's order left in place 350.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from kvtuner_jax import assets
from kvtuner_jax.errors import AssetError, ModelError
from kvtuner_jax.model import LayerParams, ModelConfig, Params, RopeScaling
from kvtuner_jax.tokenizer import Tokenizer

CACHE_ENV = "KVTUNER_CACHE_DIR"
ORBAX_META = "kvtuner_model.json"
ORBAX_TOKENIZER = "tokenizer.json"
ORBAX_PARAMS = "params"
_SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")


# ---------------------------------------------------------------------------------------------------------------------
# GGUF


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of HF Q/K rows (convert_hf_to_gguf.py): [n_head, 2, hd/2, ...] -> [n_head, hd/2, 2, ...].

    w: [n_head * hd, ...] in HF row order (out features first, as the HF weight is stored).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`: GGUF rows [n_head, hd/2, 2, ...] back to HF rows [n_head, 2, hd/2, ...]."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open_gguf(path: Path):
    import gguf

    if not path.is_file():
        raise AssetError(f"GGUF model file {path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct.error/etc. on a damaged file
        raise AssetError(f"GGUF model file {path} could not be read ({type(e).__name__}: {e})") from e


def _gguf_fields(reader) -> dict:
    out = {}
    for k, f in reader.fields.items():
        try:
            out[k] = f.contents()
        except Exception:  # fields we never read (exotic types) must not stop loading
            continue
    return out


def gguf_config(fields: dict, tensor_names: set[str], name: str, dtype: str = "float32") -> ModelConfig:
    """ModelConfig from GGUF metadata (`<arch>.*` keys) and the tensor names (tied head iff no output.weight)."""
    arch = fields.get("general.architecture")
    if arch not in _SUPPORTED_GGUF_ARCHS:
        raise ModelError(
            f"GGUF general.architecture={arch!r} is not supported (expected one of {_SUPPORTED_GGUF_ARCHS})"
        )
    if "rope_freqs.weight" in tensor_names:
        raise ModelError("GGUF holds rope_freqs.weight (Llama-3.1 RoPE scaling as a tensor), which is not supported")

    def get(key, default=None, required=True):
        v = fields.get(f"{arch}.{key}", default)
        if v is None and required:
            raise ModelError(f"GGUF metadata lacks {arch}.{key}")
        return v

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    vocab = get("vocab_size", required=False) or len(fields.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise ModelError(f"GGUF metadata lacks {arch}.vocab_size and tokenizer.ggml.tokens")
    rs = None
    if fields.get(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ModelError(f"GGUF {arch}.rope.scaling.type={fields[f'{arch}.rope.scaling.type']!r} is not supported")
    return ModelConfig(
        name=name,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", None, False) or get("rope.dimension_count", hidden // heads)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rs,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        max_position_embeddings=int(get("context_length", 8192)),
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(),  # filled in from the tokenizer by load_gguf
        dtype=dtype,
    )


def load_gguf(
    path: str | os.PathLike | None = None, dtype: str = "float32", progress: bool = False, unpermute: bool = True
) -> tuple[ModelConfig, Params, Tokenizer]:
    """Read a GGUF file, dequantize every tensor (F32/F16/BF16/Q4_0/Q4_1/Q8_0/K-quants via gguf.quants) to `dtype`.

    path: None = the embedded SmolLM2 (`assets.smollm2_gguf()`). unpermute=False keeps llama.cpp's Q/K row order
    (only useful to show that it is wrong). Raises AssetError for a missing/unreadable file, ModelError for an
    unsupported one.
    """
    from gguf.quants import dequantize

    path = Path(path) if path is not None else assets.smollm2_gguf()
    reader = _open_gguf(path)
    fields = _gguf_fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    # The file name ("SmolLM2-135M-Instruct.Q4_1") names the model users know; general.name is often a training-run
    # label ("Smollm2 135M 8k Lc100K Mix1 Ep2"). Manifests are matched against this name.
    name = re.sub(r"[.-](q\d\w*|iq\d\w*|f16|f32|bf16)$", "", path.stem, flags=re.IGNORECASE) or fields.get(
        "general.name"
    )
    cfg = gguf_config(fields, set(tensors), name=name, dtype=dtype)
    tok = Tokenizer.from_gguf_fields(fields)
    cfg = dataclasses.replace(cfg, eos_token_ids=tok.eos_token_ids)
    permuted = unpermute and fields.get("general.architecture") == "llama"

    bar = tqdm(total=len(tensors), desc=f"dequantizing {path.name}", unit="tensor", disable=not progress)

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise ModelError(f"GGUF file {path} lacks tensor {name!r}")
        try:
            a = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ModelError(f"GGUF tensor {name!r} has unsupported type {t.tensor_type.name}") from e
        a = np.asarray(a, dtype=np.float32).reshape(shape)  # numpy order = GGUF dims reversed = HF [out, in]
        bar.update(1)
        return a

    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nq, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def to(a):
        return jnp.asarray(a, dtype=dtype)

    layers = []
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        wq, wk = get(p + "attn_q.weight", (nq, D)), get(p + "attn_k.weight", (nkv, D))
        bq = bk = bv = None
        if cfg.qkv_bias:
            bq, bk, bv = (get(p + f"attn_{n}.bias", (s,)) for n, s in (("q", nq), ("k", nkv), ("v", nkv)))
        if permuted:
            wq, wk = unpermute_qk(wq, cfg.num_heads), unpermute_qk(wk, cfg.num_kv_heads)
            if bq is not None:
                bq, bk = unpermute_qk(bq, cfg.num_heads), unpermute_qk(bk, cfg.num_kv_heads)
        layers.append(
            LayerParams(
                attn_norm=to(get(p + "attn_norm.weight", (D,))),
                wq=to(wq.T),
                wk=to(wk.T),
                wv=to(get(p + "attn_v.weight", (nkv, D)).T),
                wo=to(get(p + "attn_output.weight", (D, nq)).T),
                mlp_norm=to(get(p + "ffn_norm.weight", (D,))),
                w_gate=to(get(p + "ffn_gate.weight", (F, D)).T),
                w_up=to(get(p + "ffn_up.weight", (F, D)).T),
                w_down=to(get(p + "ffn_down.weight", (D, F)).T),
                bq=None if bq is None else to(bq),
                bk=None if bk is None else to(bk),
                bv=None if bv is None else to(bv),
            )
        )
    params = Params(
        embed=to(get("token_embd.weight", (V, D))),
        layers=tuple(layers),
        final_norm=to(get("output_norm.weight", (D,))),
        lm_head=None if cfg.tie_word_embeddings else to(get("output.weight", (V, D)).T),
    )
    bar.close()
    return cfg, params, tok


# ---------------------------------------------------------------------------------------------------------------------
# HF safetensors directories


def load_hf_dir(path: str | os.PathLike, dtype: str | None = None) -> tuple[ModelConfig, Params, Tokenizer | None]:
    """Load a HF Llama/Qwen2 checkpoint directory: config.json, *.safetensors, tokenizer.json (optional).

    dtype: params dtype; default the config's torch_dtype. Returns tokenizer None when tokenizer.json is absent.
    """
    from safetensors import safe_open

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise AssetError(f"HF model directory {path} has no config.json")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise AssetError(f"{cfg_file} is not valid JSON: {e}") from e
    cfg = ModelConfig.from_hf_config(hf_cfg, name=hf_cfg.get("_name_or_path") or path.name, dtype=dtype)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise AssetError(f"HF model directory {path} has no *.safetensors files")
    tensors: dict[str, jax.Array] = {}
    for f in files:
        with safe_open(f, framework="flax") as sf:
            for k in sf.keys():
                tensors[k] = sf.get_tensor(k)

    def get(name, shape):
        if name not in tensors:
            raise ModelError(f"HF checkpoint {path} lacks tensor {name!r}")
        a = tensors[name]
        if tuple(a.shape) != shape:
            raise ModelError(f"HF tensor {name!r} has shape {tuple(a.shape)}, expected {shape}")
        return jnp.asarray(a, dtype=cfg.dtype)

    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nq, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        layers.append(
            LayerParams(
                attn_norm=get(p + "input_layernorm.weight", (D,)),
                wq=get(a + "q_proj.weight", (nq, D)).T,
                wk=get(a + "k_proj.weight", (nkv, D)).T,
                wv=get(a + "v_proj.weight", (nkv, D)).T,
                wo=get(a + "o_proj.weight", (D, nq)).T,
                mlp_norm=get(p + "post_attention_layernorm.weight", (D,)),
                w_gate=get(p + "mlp.gate_proj.weight", (F, D)).T,
                w_up=get(p + "mlp.up_proj.weight", (F, D)).T,
                w_down=get(p + "mlp.down_proj.weight", (D, F)).T,
                bq=get(a + "q_proj.bias", (nq,)) if cfg.qkv_bias else None,
                bk=get(a + "k_proj.bias", (nkv,)) if cfg.qkv_bias else None,
                bv=get(a + "v_proj.bias", (nkv,)) if cfg.qkv_bias else None,
            )
        )
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in tensors
    if tied != cfg.tie_word_embeddings:
        cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
    params = Params(
        embed=get("model.embed_tokens.weight", (V, D)),
        layers=tuple(layers),
        final_norm=get("model.norm.weight", (D,)),
        lm_head=None if tied else get("lm_head.weight", (V, D)).T,
    )
    tok = None
    if (path / "tokenizer.json").is_file():
        tc = path / "tokenizer_config.json"
        tok = Tokenizer.from_hf_dir_files(
            (path / "tokenizer.json").read_text(), json.loads(tc.read_text()) if tc.is_file() else None
        )
    return cfg, params, tok


# ---------------------------------------------------------------------------------------------------------------------
# Orbax


def _params_to_tree(params: Params) -> dict:
    """A plain nested dict (string keys, no None leaves) that Orbax stores and restores without a target."""
    tree = {"embed": params.embed, "final_norm": params.final_norm, "layers": {}}
    if params.lm_head is not None:
        tree["lm_head"] = params.lm_head
    for i, lp in enumerate(params.layers):
        tree["layers"][str(i)] = {k: v for k, v in dataclasses.asdict(lp).items() if v is not None}
    return tree


def _params_from_tree(tree: dict, cfg: ModelConfig) -> Params:
    layers = tuple(LayerParams(**tree["layers"][str(i)]) for i in range(cfg.num_layers))
    return Params(embed=tree["embed"], layers=layers, final_norm=tree["final_norm"], lm_head=tree.get("lm_head"))


def _config_to_json(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["eos_token_ids"] = list(cfg.eos_token_ids)
    return d


def _config_from_json(d: dict) -> ModelConfig:
    d = dict(d)
    rs = d.pop("rope_scaling", None)
    return ModelConfig(**d, rope_scaling=None if rs is None else RopeScaling(**rs))


def save_orbax(
    directory: str | os.PathLike,
    cfg: ModelConfig,
    params: Params,
    tokenizer: Tokenizer | str | None,
    overwrite: bool = True,
) -> Path:
    """Write config (JSON), tokenizer (JSON) and params (Orbax) under `directory`, atomically (temp dir + rename).

    tokenizer: a Tokenizer, its `to_json()` string, or None. overwrite=False keeps a checkpoint that already exists
    at `directory` when we finish (another process converted the same model first) and drops ours.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp / ORBAX_PARAMS, _params_to_tree(params))
    ckpt.wait_until_finished()
    if tokenizer is not None:
        text = tokenizer if isinstance(tokenizer, str) else tokenizer.to_json()
        (tmp / ORBAX_TOKENIZER).write_text(text)
    # The metadata file is written last: its presence marks a complete checkpoint.
    (tmp / ORBAX_META).write_text(json.dumps({"format": 1, "config": _config_to_json(cfg)}, indent=1))
    if directory.exists():
        if not overwrite:
            shutil.rmtree(tmp)
            return directory
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def is_orbax_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ORBAX_META).is_file()


def load_orbax(directory: str | os.PathLike, dtype: str | None = None) -> tuple[ModelConfig, Params, Tokenizer | None]:
    """Restore a checkpoint written by `save_orbax`. dtype: cast params (default: the dtype they were saved in)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if not is_orbax_dir(directory):
        raise AssetError(f"{directory} is not a kvtuner-jax Orbax checkpoint (no {ORBAX_META})")
    try:
        meta = json.loads((directory / ORBAX_META).read_text())
        cfg = _config_from_json(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise AssetError(f"{directory / ORBAX_META} is unreadable: {e}") from e
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    try:
        tree = ocp.StandardCheckpointer().restore(directory / ORBAX_PARAMS)
    except Exception as e:
        raise AssetError(f"Orbax params under {directory / ORBAX_PARAMS} could not be restored: {e}") from e
    tree = jax.tree.map(lambda a: jnp.asarray(a, dtype=cfg.dtype), tree)
    params = _params_from_tree(tree, cfg)
    tok_file = directory / ORBAX_TOKENIZER
    tok = Tokenizer.from_json(tok_file.read_text()) if tok_file.is_file() else None
    return cfg, params, tok


# ---------------------------------------------------------------------------------------------------------------------
# Entry point


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kvtuner-jax")


def gguf_cache_path(gguf_path: Path) -> Path:
    """Where the Orbax conversion of `gguf_path` lives: <cache dir>/<file stem>-<size in bytes>."""
    return cache_dir() / f"{gguf_path.stem}-{gguf_path.stat().st_size}"


def load_model(
    spec: str | os.PathLike | None = None, dtype: str | None = None, progress: bool = True, use_cache: bool = True
) -> tuple[ModelConfig, Params, Tokenizer | None]:
    """Load a model from None (embedded SmolLM2 GGUF), a .gguf file, a HF directory or an Orbax directory.

    A GGUF is converted once to an Orbax checkpoint under the cache directory (float32, so no precision is lost)
    and restored from it afterwards; use_cache=False parses the GGUF every time. dtype casts the params
    (default float32 for GGUF, the checkpoint's own dtype otherwise).
    """
    path = assets.smollm2_gguf() if spec is None else Path(spec)
    if not path.exists():
        raise AssetError(f"model {path} does not exist (expected a .gguf file, a HF directory or an Orbax directory)")
    if path.is_dir():
        if is_orbax_dir(path):
            return load_orbax(path, dtype)
        if (path / "config.json").is_file():
            return load_hf_dir(path, dtype)
        raise AssetError(f"directory {path} holds neither {ORBAX_META} (Orbax) nor config.json (HF)")
    if path.suffix != ".gguf":
        raise AssetError(f"model file {path} is not a .gguf file")
    if not use_cache:
        return load_gguf(path, dtype=dtype or "float32", progress=progress)
    target = gguf_cache_path(path)
    if is_orbax_dir(target):
        return load_orbax(target, dtype)
    t0 = time.perf_counter()
    cfg, params, tok = load_gguf(path, dtype="float32", progress=progress)
    save_orbax(target, cfg, params, tok, overwrite=False)
    if progress:
        tqdm.write(f"converted {path.name} to Orbax at {target} in {time.perf_counter() - t0:.1f} s")
    if dtype is not None and dtype != cfg.dtype:
        cfg = dataclasses.replace(cfg, dtype=dtype)
        params = jax.tree.map(lambda a: a.astype(dtype), params)
    return cfg, params, tok
