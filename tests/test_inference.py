"""run_inference.py and its library: error paths exit 2 with one clear line, manifest resolution (file, none, serving
flags, beside the checkpoint), and one real end-to-end run on the embedded SmolLM2."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from kvtuner_jax import inference, model
from kvtuner_jax import manifest as mf
from kvtuner_jax.errors import KVTunerError, ManifestError
from kvtuner_jax.inference import InferenceConfig, KVFlags, resolve_manifest, save_manifest_beside
from kvtuner_jax.sampling import SamplingParams
from kvtuner_jax.weights import save_orbax

REPO = Path(__file__).resolve().parent.parent
SMOL = model.ModelConfig(
    name="SmolLM2-135M-Instruct",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, str(REPO / "run_inference.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


def test_cli_missing_model_file():
    assert "/nope/model.gguf does not exist" in one_error_line(cli("--model=/nope/model.gguf"))


def test_cli_bad_flag_combinations():
    line = one_error_line(cli("--manifest=configs/smollm2_k4v4.json", "--kv_nbits_key=4"))
    assert "cannot be combined with the --kv_* flags" in line
    assert "temperature must be >= 0" in one_error_line(cli("--temperature=-1"))


def test_manifest_for_another_model():
    with pytest.raises(ManifestError, match="model.num_layers: manifest has 32, model has 30"):
        resolve_manifest(str(REPO / "configs/llama31_8b_kvtuner_3.25bit.json"), None, SMOL)
    with pytest.raises(ManifestError, match="does not exist"):
        resolve_manifest("/nope.json", None, SMOL)


def test_manifest_resolution_order(tmp_path):
    tiny = dataclasses.replace(model.tiny_config(), name="SmolLM2-135M-Instruct")
    ident = inference.model_identity(tiny)
    ckpt = save_orbax(tmp_path / "ckpt", tiny, model.init_random_params(tiny, jax.random.key(0)), None)
    # nothing beside the checkpoint: the default file (written for SmolLM2's 30 layers) does not fit the tiny model
    with pytest.raises(ManifestError, match="num_layers"):
        resolve_manifest(None, None, tiny, str(ckpt))
    beside = mf.uniform(ident, 4, 2, k_group_size=16, v_group_size=16)
    path = save_manifest_beside(ckpt, beside)
    assert path == ckpt / "kvtuner_manifest.json"
    m, src = resolve_manifest(None, None, tiny, str(ckpt))
    assert m == beside and "beside the checkpoint" in src
    m, src = resolve_manifest("none", None, tiny, str(ckpt))
    assert m.layer_bits() == ((16, 16),) * 2 and "16-bit" in src
    kv = KVFlags(nbits_key=8, nbits_value=2, asym=False, axis_key="channel", group_size=8, residual_length=8)
    m, src = resolve_manifest(None, kv, tiny, str(ckpt))
    spec = m.layer(1)
    assert (spec.k.bits, spec.v.bits, spec.k.axis, spec.v.axis) == (8, 2, "channel", "token")
    assert spec.k.symmetric and spec.v.symmetric and spec.k.group_size == 8 and spec.residual_length == 8
    assert "K8/V2" in src
    with pytest.raises(KVTunerError, match="cannot be combined"):
        resolve_manifest(str(path), kv, tiny)
    with pytest.raises(KVTunerError, match="--kv_\\* flags: .*mode"):
        resolve_manifest(None, dataclasses.replace(kv, mode="fp3"), tiny)
    with pytest.raises(KVTunerError, match="--kv_\\* flags: .*group_size"):
        resolve_manifest(None, KVFlags(nbits_key=4, group_size=5), tiny)
    with pytest.raises(KVTunerError, match="not a directory"):
        save_manifest_beside(tmp_path / "missing", beside)


@pytest.mark.slow
def test_end_to_end_embedded_model(capsys):
    """The embedded SmolLM2 through run(): text comes out, with the plan and the stats line; then the error path of
    a prompt that cannot fit the cache (one page) exits 2 with the reason."""
    out = io.StringIO()
    cfg = InferenceConfig(
        prompts=("The capital of France is",),
        sampling=SamplingParams(max_new_tokens=4),
        backend="reference",
        page_size=16,
    )
    texts = inference.run(cfg, out=out)
    log = out.getvalue()
    assert len(texts) == 1 and texts[0].strip()
    assert "smollm2_k8v4.json (default)" in log and "max concurrent tokens" in log
    assert "stats: layers K/V bits 0-29:8/4" in log and "pages free" in log
    assert "attention precision auto: not used here" in log  # the reference backend
    long = " ".join(["word"] * 200)
    bad = dataclasses.replace(cfg, prompts=(long,), num_pages=1)
    with pytest.raises(SystemExit) as e:
        inference.main_guard(lambda: inference.run(bad, out=io.StringIO()))
    assert e.value.code == 2
    assert "prompt 0: " in capsys.readouterr().err


def test_jsonl_inputs_one_reader_errors_name_file_and_line(tmp_path):
    """Prompts (key "prompt") and eval texts (key "text") come from the same JSONL reader."""
    from kvtuner_jax import eval as ev
    from kvtuner_jax.assets import read_jsonl_strings
    from kvtuner_jax.errors import AssetError

    good = tmp_path / "p.jsonl"
    good.write_text('"plain"\n\n{"prompt": "a", "text": "b"}\n')
    assert inference.read_prompts(inference.InferenceConfig(prompts_file=str(good))) == ["plain", "a"]
    assert ev.load_texts([str(good)]) == ["plain", "b"]
    bad = tmp_path / "q.jsonl"
    bad.write_text('"ok"\n{"text": 3}\n')
    with pytest.raises(AssetError, match=f'{bad}:2: expected a JSON string or an object with a "text" string'):
        read_jsonl_strings(bad, "text")
    bad.write_text('"ok"\n{oops\n')
    with pytest.raises(AssetError, match=f"{bad}:2: not valid JSON"):
        inference.read_prompts(inference.InferenceConfig(prompts_file=str(bad)))


def test_precision_line_says_what_each_layer_runs():
    """The start-up line resolves "auto" per layer (bf16 for per-channel quantized keys, high otherwise) on a kernel
    backend, and says where the precision does not apply."""
    from kvtuner_jax.specs import KVSpec, LayerSpec

    kivi = LayerSpec(KVSpec(4, axis="channel", group_size=32), KVSpec(2, group_size=32))
    tok = LayerSpec(KVSpec(8, group_size=64), KVSpec(4, group_size=64))
    full = LayerSpec(KVSpec(16), KVSpec(16))
    specs = (kivi, kivi, tok, full)
    assert (
        inference.precision_line(specs, "auto", "gpu") == "attention precision auto: bf16 in 2 layers, high in 2 layers"
    )
    assert inference.precision_line(specs[:3], "high", "gpu") == "attention precision high: high in 3 layers"
    assert inference.precision_line((kivi,), "auto", "gpu") == "attention precision auto: bf16 in 1 layer"
    assert "float32 reference" in inference.precision_line(specs, "bf16", "reference")
    assert "TPU kernel" in inference.precision_line(specs, "auto", "tpu")


def test_kernel_line_says_which_gpu_kernel_each_layer_runs():
    """On a Hopper GPU, per-token layers with an 8-bit side run the Mosaic GPU kernel at pages of 16 to 128 tokens,
    2- and 4-bit ones at pages of 32 and 64 (where it was timed faster); at a page size it does not read the line
    says which would give it them; elsewhere everything is the Triton kernel."""
    from kvtuner_jax.specs import KVSpec, LayerSpec

    d = 64
    eight = LayerSpec(KVSpec(8, group_size=d), KVSpec(8, group_size=d))
    eight4 = LayerSpec(KVSpec(8, group_size=d), KVSpec(4, group_size=d))
    four = LayerSpec(KVSpec(4, group_size=d), KVSpec(4, group_size=d))
    kivi8 = LayerSpec(KVSpec(8, axis="channel", group_size=32), KVSpec(4, group_size=32))
    mixed = LayerSpec(KVSpec(4, group_size=d), KVSpec(8, group_size=d, mode="fp8"))  # no GPU kernel: the reference
    specs = (eight, eight4, four, kivi8)

    def line(page, capability="9.0", backend="gpu", specs=specs):
        return inference.kernel_line(
            specs, heads=12, kv_heads=4, head_dim=d, page_size=page, backend=backend, capability=capability
        )

    assert line(64) == line(32) == "decode attention kernels: Mosaic GPU in 3 layers, Triton in 1 layer"
    assert line(16) == line(128) == "decode attention kernels: Mosaic GPU in 2 layers, Triton in 2 layers"
    assert line(48) == (
        "decode attention kernels: Triton in 4 layers; with --page_size 64 3 per-token layers would run the Mosaic "
        "GPU kernel (decode attention 1.2-1.5x faster on an H100, BENCHMARKS.md)"
    )
    assert line(48, specs=(kivi8,)) == "decode attention kernels: Triton in 1 layer"
    assert line(64, capability="8.0") == "decode attention kernels: Triton in 4 layers"
    assert line(64, backend="reference") is None
    assert line(64, specs=(eight, mixed)) == "decode attention kernels: Mosaic GPU in 1 layer, the reference in 1 layer"
    # mode int_block: the Mosaic GPU kernel on Hopper at pages of 64, the reference elsewhere (never Triton)
    block = LayerSpec(KVSpec(4, group_size=d, mode="int_block"), KVSpec(2, group_size=d, mode="int_block"))
    assert line(64, specs=(block, four)) == "decode attention kernels: Mosaic GPU in 2 layers"
    assert line(32, specs=(block, four)) == (
        "decode attention kernels: Mosaic GPU in 1 layer, the reference in 1 layer; mode int_block layers run the "
        "Mosaic GPU kernel at --page_size 64"
    )
    assert line(64, capability="8.0", specs=(block,)) == "decode attention kernels: the reference in 1 layer"
