"""Generate text with a layer-wise mixed-precision, paged, packed KV cache.

    python run_inference.py --prompt "..." [--manifest configs/smollm2_k8v4.json] [--model path] [--chat]

Flags map onto kvtuner_jax.inference.InferenceConfig; the logic lives in the library.
"""

from __future__ import annotations

from absl import app, flags, logging

from kvtuner_jax.inference import InferenceConfig, main_guard, run
from kvtuner_jax.sampling import SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "model", None, "Model: a .gguf file, an HF directory or an Orbax directory (default: embedded SmolLM2)."
)
flags.DEFINE_string("manifest", None, "KV manifest JSON (default: configs/smollm2_k8v4.json); 'none' = all 16-bit.")
flags.DEFINE_multi_string("prompt", [], "Prompt text (repeatable).")
flags.DEFINE_string("prompts_file", None, 'JSONL file: one string or {"prompt": ...} per line.')
flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("top_k", 0, "Top-k filter; 0 = off.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("chat", False, "Wrap each prompt in the model's chat template.")
flags.DEFINE_integer("page_size", 32, "Tokens per KV page.")
flags.DEFINE_integer("num_pages", None, "Physical KV pages (default: enough for the prompts).")
flags.DEFINE_float("kv_cache_gb", None, "KV memory budget in GiB (sets the page count).")
flags.DEFINE_enum("backend", "auto", ["auto", "reference", "gpu", "tpu"], "Attention/write kernels.")
flags.DEFINE_string("dtype", None, "Params/activations dtype (default float32 on CPU, bfloat16 on accelerators).")


def main(argv):
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = InferenceConfig(
        model=FLAGS.model,
        manifest=FLAGS.manifest,
        prompts=tuple(FLAGS.prompt),
        prompts_file=FLAGS.prompts_file,
        chat=FLAGS.chat,
        sampling=SamplingParams(
            temperature=FLAGS.temperature,
            top_k=FLAGS.top_k,
            top_p=FLAGS.top_p,
            max_new_tokens=FLAGS.max_new_tokens,
            seed=FLAGS.seed,
        ),
        page_size=FLAGS.page_size,
        num_pages=FLAGS.num_pages,
        kv_cache_gb=FLAGS.kv_cache_gb,
        backend=FLAGS.backend,
        dtype=FLAGS.dtype,
    )
    main_guard(lambda: run(cfg))


if __name__ == "__main__":
    app.run(main)
