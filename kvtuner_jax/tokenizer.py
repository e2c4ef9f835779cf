"""Tokenizer: byte-level BPE built with the `tokenizers` library, from GGUF metadata or a HF tokenizer.json.

From GGUF (`tokenizer.ggml.model == "gpt2"`): vocabulary `tokenizer.ggml.tokens`, merges `tokenizer.ggml.merges`,
token types `tokenizer.ggml.token_type` (3 = control, 4 = user-defined: both become special added tokens that encode as
one id and are never split). The pre-tokenizer follows llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`): for
"smollm"/"starcoder"/"refact" digits are split one by one before GPT-2's byte-level regex, as in SmolLM2's
tokenizer.json.

Chat: `apply_chat_template` renders the GGUF/HF template string with jinja2 when it is installed; otherwise it uses a
built-in ChatML renderer equal to SmolLM2's template (default system prompt inserted when the first message is not a
system message; `<|im_start|>assistant\n` appended when `add_generation_prompt`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from kvtuner_jax.errors import AssetError, ModelError

# SmolLM2's default system prompt, used by the ChatML fallback (it is in the GGUF's chat template).
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "deepseek-coder")
_CONTROL, _USER_DEFINED = 3, 4


class Tokenizer:
    """Encode/decode text and render chats.

    bos_token_id: id prepended by `encode(add_bos=True)`; eos_token_ids: ids that end generation.
    """

    def __init__(
        self,
        hf: tokenizers.Tokenizer,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        chat_template: str | None = None,
        add_bos: bool = False,
    ):
        self.hf = hf
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(int(e) for e in eos_token_ids)
        self.chat_template = chat_template
        self.add_bos = add_bos

    # -- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any]) -> Tokenizer:
        """From GGUF metadata values (key -> python value, as `gguf.ReaderField.contents()` returns them)."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelError(f"GGUF tokenizer.ggml.model={kind!r} is not supported (expected 'gpt2' byte-level BPE)")
        try:
            tokens = list(fields["tokenizer.ggml.tokens"])
            merges = list(fields["tokenizer.ggml.merges"])
        except KeyError as e:
            raise ModelError(f"GGUF metadata lacks {e.args[0]!r}") from e
        types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if fields.get("tokenizer.ggml.pre") in _DIGIT_SPLIT_PRE:
            hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            hf.pre_tokenizer = byte_level
        hf.decoder = decoders.ByteLevel()
        specials = [
            tokenizers.AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty in (_CONTROL, _USER_DEFINED)
        ]
        hf.add_special_tokens(specials)

        bos = fields.get("tokenizer.ggml.bos_token_id")
        eos = [fields.get("tokenizer.ggml.eos_token_id"), fields.get("tokenizer.ggml.eot_token_id")]
        # Besides the file's eos (SmolLM2: <|im_end|>), the document end also stops generation.
        eos += [vocab.get(t) for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")]
        eos_ids = tuple(dict.fromkeys(int(e) for e in eos if e is not None))
        return cls(
            hf,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
            chat_template=fields.get("tokenizer.chat_template"),
            add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """From `to_json()` output, or from a plain HF tokenizer.json string (then bos/eos come from its specials)."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise AssetError(f"tokenizer JSON is not valid JSON: {e}") from e
        if "kvtuner_tokenizer" in d:
            return cls(
                tokenizers.Tokenizer.from_str(d["tokenizer"]),
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=d.get("eos_token_ids", ()),
                chat_template=d.get("chat_template"),
                add_bos=bool(d.get("add_bos", False)),
            )
        hf = tokenizers.Tokenizer.from_str(text)
        eos = [hf.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")]
        bos = next((i for t in ("<|begin_of_text|>", "<|im_start|>") if (i := hf.token_to_id(t)) is not None), None)
        return cls(hf, bos_token_id=bos, eos_token_ids=[e for e in eos if e is not None])

    @classmethod
    def from_hf_dir_files(cls, tokenizer_json: str, tokenizer_config: dict | None = None) -> Tokenizer:
        """From a HF model directory's tokenizer.json text and (optional) tokenizer_config.json dict."""
        tok = cls.from_json(tokenizer_json)
        cfg = tokenizer_config or {}
        if cfg.get("chat_template"):
            tok.chat_template = cfg["chat_template"]

        def tid(t):
            t = t.get("content") if isinstance(t, dict) else t
            return None if t is None else tok.hf.token_to_id(t)

        if tid(cfg.get("bos_token")) is not None:
            tok.bos_token_id = tid(cfg.get("bos_token"))
        if tid(cfg.get("eos_token")) is not None:
            tok.eos_token_ids = tuple(dict.fromkeys((tid(cfg["eos_token"]), *tok.eos_token_ids)))
        return tok

    def to_json(self) -> str:
        """Everything needed to rebuild this tokenizer (HF tokenizer JSON plus ids and chat template)."""
        return json.dumps(
            {
                "kvtuner_tokenizer": 1,
                "tokenizer": self.hf.to_str(),
                "bos_token_id": self.bos_token_id,
                "eos_token_ids": list(self.eos_token_ids),
                "chat_template": self.chat_template,
                "add_bos": self.add_bos,
            }
        )

    # -- use ------------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. Special-token strings in the text (e.g. "<|im_start|>") encode as their single id.

        add_bos: prepend bos_token_id; default self.add_bos (False for SmolLM2, whose HF tokenizer adds nothing).
        """
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's chat template.

        Uses jinja2 on `chat_template` when jinja2 is installed, else the built-in ChatML renderer (SmolLM2's
        template). Returns the prompt text, or its ids when tokenize=True.
        """
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        text = None
        if self.chat_template:
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:
                ImmutableSandboxedEnvironment = None
            if ImmutableSandboxedEnvironment is not None:
                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                text = env.from_string(self.chat_template).render(
                    messages=list(messages), add_generation_prompt=add_generation_prompt
                )
        if text is None:
            text = chatml(messages, add_generation_prompt)
        return self.encode(text, add_bos=False) if tokenize else text


def chatml(messages: Sequence[dict[str, str]], add_generation_prompt: bool = True, system: str = SMOLLM2_SYSTEM) -> str:
    """SmolLM2's ChatML template, without jinja2."""
    out = []
    if messages and messages[0]["role"] != "system" and system is not None:
        out.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    out += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
