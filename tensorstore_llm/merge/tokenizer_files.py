"""Tokenizer files in and out for the vocabulary of a merge (``merge/tokenizer.py``).

Most tokenizers that transformers 5 saves are a ``tokenizer.json`` (the ``tokenizers`` library's
own serialization) plus a ``tokenizer_config.json`` naming the generic class
``TokenizersBackend`` (or ``PreTrainedTokenizerFast``). For those, transformers' ``AutoTokenizer``
does little more than ``tokenizers.Tokenizer.from_file`` and reading the special tokens from the
config, so they are loaded here with the ``tokenizers`` library alone (milliseconds; importing
transformers takes seconds and ~100 MiB). Everything else falls back to transformers, as before.

The fast path is taken only where it gives what ``AutoTokenizer.from_pretrained`` gives (the same
vocabulary, added tokens and special tokens): ``backend_refusal`` names the first condition a
model's files miss. Conditions, from transformers 5's loader (``models/auto/tokenization_auto.py``,
``tokenization_utils_base.py``, ``tokenization_utils_tokenizers.py``):

- ``tokenizer.json`` and ``tokenizer_config.json`` exist, the class is generic, no ``auto_map``
  (remote code), the backend is ``tokenizers``;
- no ``special_tokens_map.json`` or ``added_tokens.json`` (legacy files that override the config);
- ``config.json``'s model type is not one whose generic declaration transformers replaces by a
  model-specific class (``MODEL_SPECIFIC_TYPES``; tests check the list against transformers);
- ``tokenizer.json`` sets no padding (transformers takes a pad token from it);
- every special token the config names is already a special added token of ``tokenizer.json``
  (transformers would add a missing one), and an ``added_tokens_decoder`` in the config agrees
  with ``tokenizer.json``'s added tokens entry by entry.

The output tokenizer of the fast path is ``tokenizer.json`` re-serialized with the new tokens, the
base's ``tokenizer_config.json`` (its ``added_tokens_decoder``, if any, extended) and its chat
template files; transformers loads it to the same tokenizer that ``save_pretrained`` of the
transformers path gives (tests/test_tokenizer_merge.py checks both on SmolLM2's tokenizer).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping

from ..errors import TokenizerError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "tokenizer.model", "vocab.txt", "chat_template.jinja", "chat_template.json")
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# transformers 5 loads these model types with a model-specific tokenizer class even when the
# config declares a generic one (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS mapped to a class)
MODEL_SPECIFIC_TYPES = frozenset({"hyperclovax_vision_v2", "qwen2", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text",
                                  "qwen4_exp", "siglip2"})
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
_ADDED_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


def file_bytes(entry) -> bytes:
    """A carried file's bytes (``entry``: bytes, or a path read and closed)."""
    if isinstance(entry, bytes):
        return entry
    with open(entry, "rb") as f:
        return f.read()


class BackendTokenizer:
    """A ``tokenizer.json`` loaded with the ``tokenizers`` library, with the attributes of a
    transformers tokenizer that the vocabulary builder uses: ``get_vocab()``,
    ``added_tokens_decoder``, ``add_tokens(...)``, ``bos_token`` / ``eos_token`` / ``unk_token`` /
    ``pad_token`` (strings or None), and ``saved()`` (the output files)."""

    def __init__(self, tokenizer, config: dict, files: Mapping):
        self._tokenizer, self._config, self._files = tokenizer, config, files
        for name in NAMED_SPECIAL:
            setattr(self, name, _content(config.get(name)))

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id, added tokens included (transformers' ``get_vocab()``)."""
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict:
        """Id -> ``tokenizers.AddedToken`` of every added token."""
        return self._tokenizer.get_added_tokens_decoder()

    def add_tokens(self, tokens: list) -> int:
        """Add strings or ``AddedToken`` s, as transformers' ``add_tokens(tokens)`` does."""
        return self._tokenizer.add_tokens(list(tokens)) if tokens else 0

    def saved(self) -> dict[str, bytes]:
        """The output tokenizer's files (see the module's notes)."""
        out = {"tokenizer.json": self._tokenizer.to_str(pretty=True).encode()}
        config = dict(self._config)
        if isinstance(config.get("added_tokens_decoder"), dict):
            config["added_tokens_decoder"] = {
                str(idx): {k: getattr(token, k) for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
                for idx, token in sorted(self.added_tokens_decoder.items())}
            out["tokenizer_config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()
        else:
            out["tokenizer_config.json"] = file_bytes(self._files["tokenizer_config.json"])
        for name in CHAT_TEMPLATE_FILES:
            if name in self._files:
                out[name] = file_bytes(self._files[name])
        return out


def _content(value):
    """A special token's string from its config value (a string, or an AddedToken as a dict)."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _json(files: Mapping, name: str):
    try:
        return json.loads(file_bytes(files[name]))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def backend_refusal(files: Mapping) -> str | None:
    """Why ``files`` (one model's carried files) cannot be loaded with the ``tokenizers`` library
    alone to the tokenizer transformers would load; None when they can.

    Example:
        >>> backend_refusal({"vocab.json": b"{}"})
        'no tokenizer.json'
    """
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if name not in files:
            return f"no {name}"
    for name in ("special_tokens_map.json", "added_tokens.json"):
        if name in files:
            return f"a legacy {name}"
    config, spec = _json(files, "tokenizer_config.json"), _json(files, "tokenizer.json")
    if not isinstance(config, dict) or not isinstance(spec, dict):
        return "tokenizer_config.json or tokenizer.json is not a JSON object"
    if config.get("tokenizer_class") not in GENERIC_CLASSES:
        return f"tokenizer class {config.get('tokenizer_class')!r} (only {', '.join(GENERIC_CLASSES)})"
    if "auto_map" in config or config.get("backend", "tokenizers") != "tokenizers":
        return "remote code or another backend"
    model = _json(files, "config.json") if "config.json" in files else {}
    if isinstance(model, dict) and model.get("model_type") in MODEL_SPECIFIC_TYPES:
        return f"model type {model.get('model_type')!r} (transformers uses a model-specific tokenizer class)"
    if spec.get("padding") is not None:
        return "tokenizer.json sets padding"
    added = {t.get("content"): t for t in spec.get("added_tokens") or () if isinstance(t, dict)}
    for value in _special_values(config):
        token = added.get(_content(value))
        if token is None or not token.get("special"):
            return f"special token {_content(value)!r} is not a special added token of tokenizer.json"
    decoder = config.get("added_tokens_decoder")
    if decoder is not None:
        by_id = {t.get("id"): t for t in added.values()}
        if not isinstance(decoder, dict) or len(decoder) != len(by_id):
            return "added_tokens_decoder disagrees with tokenizer.json"
        for idx, entry in decoder.items():
            mine = by_id.get(int(idx)) if str(idx).isdigit() else None
            if not isinstance(entry, dict) or mine is None or any(entry.get(k) != mine.get(k) for k in _ADDED_FIELDS):
                return "added_tokens_decoder disagrees with tokenizer.json"
    return None


def _special_values(config: dict) -> list:
    """Every special token the config names: bos ... mask, extra / additional special tokens and
    model-specific ``*_token`` keys (transformers adds each one that the vocabulary lacks)."""
    values = [config[k] for k in config if k.endswith("_token") and isinstance(config[k], (str, dict))]
    for key in ("extra_special_tokens", "additional_special_tokens"):
        extra = config.get(key)
        if isinstance(extra, dict):
            values.extend(extra.values())
        elif isinstance(extra, (list, tuple)):
            values.extend(extra)
    return [v for v in values if _content(v) is not None]


def load_tokenizer(files: Mapping, ref: str, where: str, backend: str = "auto"):
    """The tokenizer in ``files`` (name -> path or bytes), never running remote code or unpickling.

    Args:
        backend: ``auto`` (the ``tokenizers`` library where ``backend_refusal`` allows, else
            transformers), ``tokenizers`` (refused where not allowed) or ``transformers``.
    Returns:
        A BackendTokenizer or a transformers fast tokenizer (the same attributes are used).
    Raises:
        TokenizerError naming the model and the reason when the files cannot be loaded.
    """
    refusal = backend_refusal(files) if backend != "transformers" else "transformers asked for"
    if refusal is None:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_str(file_bytes(files["tokenizer.json"]).decode("utf-8"))
        except Exception as e:  # noqa: BLE001 (the Rust parser raises plain Exceptions)
            raise TokenizerError(f"{where}: cannot load the tokenizer of model {ref}: {type(e).__name__}: {e}") from None
        return BackendTokenizer(tokenizer, _json(files, "tokenizer_config.json"), files)
    if backend == "tokenizers":
        raise TokenizerError(f"{where}: the tokenizer of model {ref} needs transformers to load: {refusal}")
    return _load_with_transformers(files, ref, where)


def _load_with_transformers(files: Mapping, ref: str, where: str):
    """A fast transformers tokenizer from copies of ``files``' tokenizer files (no remote code)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="tsllm-tok-") as tmp:
        for name in (*TOKENIZER_FILES, "config.json"):
            if name in files:
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(file_bytes(files[name]))
        try:
            return AutoTokenizer.from_pretrained(tmp, use_fast=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 (transformers raises many kinds; the user needs the model and the reason)
            raise TokenizerError(f"{where}: cannot load the tokenizer of model {ref}: {type(e).__name__}: {e}") from None


def saved_files(tok) -> dict[str, bytes]:
    """The files of tokenizer ``tok`` (either kind ``load_tokenizer`` returns): name -> bytes."""
    if isinstance(tok, BackendTokenizer):
        return tok.saved()
    with tempfile.TemporaryDirectory(prefix="tsllm-tok-out-") as tmp:
        tok.save_pretrained(tmp)
        out = {}
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                out[name] = f.read()
        return out
