"""mergekit's tokenizer settings: ``tokenizer_source`` (``base``, ``union`` or a model of the
recipe) and the ``tokenizer:`` block (``source``, default ``union`` as in mergekit; ``tokens``
with a per-token ``source`` / ``force``; ``pad_to_multiple_of``). This module reads them, builds
the output tokenizer and, for each model, the map from output token ids to its embedding rows;
``merge/vocab.py`` streams the embedding and LM-head rows through those maps.

The rules (mergekit 0.1.5's, restated; differences named):

- **Output vocabulary.** ``base``: the base model's tokenizer (the first model's without a
  base). A model: that model's tokenizer. ``union``: the base's tokenizer, then the tokens of the
  other models (recipe order) that it lacks: their ordinary tokens first (each model's id order),
  then their added tokens (the first model's settings of a token win). mergekit walks ordinary
  tokens in hash order, so the ids it gives to more than one new ordinary token vary between
  runs; here they are fixed. Tokens named under ``tokens:`` that are still missing come last.
  A model's tokens with ids at or past its ``config.json`` ``vocab_size`` are not part of it
  (for the base of ``base`` / ``union`` such tokens are refused: mergekit rewrites the tokenizer
  without them, tsllm does not).
- **Rows.** Output token t of model m is m's row of the same token string. A token some model
  lacks (or whose ``tokens:`` entry says ``force: true``) gets a fill row: the entry's source if
  given (``{kind: zero}``: zeros; a model: that model's row of the token; ``{kind: model_token,
  model, token | token_id}``: that model's row of that token or id); else the row of the only
  model that has it, zeros if none has it, the base's row if the base has it, otherwise the
  mean (fp32, recipe order) of the rows of the models that have it (an entry without a source
  takes these rules too; mergekit fails on it). A model keeps its own row of a token it has
  unless the token is forced.
- **Padding.** With ``pad_to_multiple_of`` the vocabulary is rounded up; each model's padding
  rows are the mean of its (mapped and filled) rows over the real tokens, computed by a
  reduction job of the engine (float64 sums, rounded once).
- **Refused before any work** (TokenizerError): a tokenizer source (or a union member) with no
  tokenizer files, a union over tokenizers whose bos / eos / unk / pad tokens differ, a
  ``tokens:`` entry naming a model that is not in the recipe or a token that model lacks.
  Without tokenizer files anywhere, ``base`` over models of equal vocabulary sizes keeps the
  old meaning (nothing to map), as before this module existed.

Tokenizers are loaded by ``merge/tokenizer_files.py``: with the ``tokenizers`` library alone where
that gives what transformers would (a generic ``tokenizer.json``), else with transformers from
copies of the carried tokenizer files (never remote code, never pickles).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import RecipeError, TokenizerError
from .safe_yaml import short
from .tokenizer_files import (
    TOKENIZER_FILES,
    VOCAB_FILES,
    file_bytes,
    load_tokenizer,
    saved_files,
)

__all__ = ["TOKENIZER_FILES", "VOCAB_FILES", "TokenizerSpec", "Vocabulary", "build_vocabulary", "file_bytes",
           "parse_tokenizer_settings", "with_vocabulary"]
SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class TokenSource:
    """Where a ``tokens:`` entry takes its row: ``kind`` zero, model (that model's row of the
    token) or model_token (``model``'s row of ``token`` or of ``token_id``)."""

    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenRule:
    source: TokenSource | None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The recipe's tokenizer settings: ``source`` is base, union or a model reference."""

    source: str
    tokens: dict = field(default_factory=dict)          # token string -> TokenRule, in recipe order
    pad_to_multiple_of: int | None = None


def parse_tokenizer_settings(raw: dict, refs: list[str], where: str) -> TokenizerSpec | None:
    """``tokenizer_source`` or the ``tokenizer:`` block of recipe ``raw`` (a mapping), checked
    against the recipe's model references ``refs``; None when neither is given.

    Example:
        >>> parse_tokenizer_settings({"tokenizer_source": "union"}, ["a", "b"], "r.yaml").source
        'union'
    """
    source, block = raw.get("tokenizer_source"), raw.get("tokenizer")
    if source is not None and block is not None:
        raise RecipeError(f"{where}: give tokenizer_source or a tokenizer: block, not both (as mergekit)")
    if source is None and block is None:
        return None
    tokens, pad = {}, None
    if block is not None:
        if not isinstance(block, dict):
            raise RecipeError(f"{where}: tokenizer must be a mapping (source, tokens, pad_to_multiple_of), got {short(block)}")
        unknown = sorted(set(block) - {"source", "tokens", "pad_to_multiple_of"})
        if unknown:
            raise RecipeError(f"{where}: tokenizer has unknown key(s) {unknown}; mergekit's are source, tokens, pad_to_multiple_of")
        source = block.get("source") if block.get("source") is not None else "union"
        tokens = _parse_tokens(block.get("tokens"), refs, f"{where}: tokenizer.tokens")
        pad = block.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise RecipeError(f"{where}: tokenizer.pad_to_multiple_of must be a positive integer, got {short(pad)}")
    key = "tokenizer.source" if block is not None else "tokenizer_source"
    if not isinstance(source, str) or not source:
        raise RecipeError(f"{where}: {key} must be base, union or a model of the recipe, got {short(source)}")
    if source not in ("base", "union") and source not in refs:
        raise RecipeError(f"{where}: {key} {source!r} is not a model of this recipe ({', '.join(refs)}); "
                          f"give base, union or one of them")
    return TokenizerSpec(source, tokens, pad)


def _parse_tokens(value: Any, refs: list[str], where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where} must map token strings to {{source, force}}, got {short(value)}")
    rules = {}
    for token, entry in value.items():
        here = f"{where}[{token!r}]"
        if not isinstance(token, str) or not token:
            raise RecipeError(f"{where}: a token must be a non-empty string, got {short(token)}")
        entry = {} if entry is None else entry
        if not isinstance(entry, dict) or set(entry) - {"source", "force"}:
            raise RecipeError(f"{here} must be a mapping with source and / or force, got {short(entry)}")
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise RecipeError(f"{here}.force must be true or false, got {short(force)}")
        rules[token] = TokenRule(_token_source(entry.get("source"), refs, f"{here}.source"), force)
    return rules


def _token_source(value: Any, refs: list[str], where: str) -> TokenSource | None:
    if value is None:
        return None
    if isinstance(value, str):
        _check_model(value, refs, where)
        return TokenSource("model", value)
    if not isinstance(value, dict) or value.get("kind") not in ("zero", "model_token"):
        raise RecipeError(f"{where} must be a model, {{kind: zero}} or {{kind: model_token, model, token | token_id}}, "
                          f"got {short(value)}")
    if value["kind"] == "zero":
        if set(value) != {"kind"}:
            raise RecipeError(f"{where}: kind zero takes no other keys, got {short(value)}")
        return TokenSource("zero")
    if set(value) - {"kind", "model", "token", "token_id"} or "model" not in value:
        raise RecipeError(f"{where}: kind model_token takes model and one of token / token_id, got {short(value)}")
    model, token, token_id = str(value["model"]), value.get("token"), value.get("token_id")
    _check_model(model, refs, where)
    if (token is None) == (token_id is None):
        raise RecipeError(f"{where}: give exactly one of token and token_id, got {short(value)}")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise RecipeError(f"{where}.token_id must be a non-negative integer, got {short(token_id)}")
    if token is not None and not isinstance(token, str):
        raise RecipeError(f"{where}.token must be a string, got {short(token)}")
    return TokenSource("model_token", model, token, token_id)


def _check_model(ref: str, refs: list[str], where: str) -> None:
    if ref not in refs:
        raise TokenizerError(f"{where}: model {ref!r} is not in the recipe ({', '.join(refs)})")


@dataclass
class Vocabulary:
    """The output vocabulary and how each model's vocabulary rows map onto it.

    ``rows`` output rows, of which the first ``tokens`` are real tokens (the rest padding);
    ``own[ref]``: per output id, the model's own row, or -1 where it takes a fill row;
    ``files``: the output tokenizer's files (name -> bytes), None to keep the base's.
    ``fills_for(models)`` gives the fill rows when ``models`` are merged into a tensor.
    """

    tokens: int
    rows: int
    own: dict[str, np.ndarray]
    files: dict[str, bytes] | None
    pad_to_multiple_of: int | None = None
    rules: tuple = ()   # (spec, base, token -> id, ref -> vocab, ref -> vocab_size, where, ref -> row before forcing)
    _fills: dict = field(default_factory=dict)

    def fills_for(self, models) -> dict[int, tuple]:
        """Output id -> ((ref, row), ...) averaged in order (empty: zeros), for every token one of
        ``models`` (the models merged into one tensor, recipe order) lacks or that is forced. As in
        mergekit, only those models count: in a sliced recipe the embedding's fill rows come from
        the first slice's models, the LM head's from the last slice's."""
        models = tuple(models)
        if models not in self._fills:
            spec, base, vocab, vocabs, sizes, where, present = self.rules
            self._fills[models] = _fills(spec, base, list(models), vocab, present, vocabs, sizes, where)
        return self._fills[models]

    def unchanged(self, sizes: Mapping[str, int]) -> bool:
        """Whether every model's rows are already the output's (``sizes``: ref -> its rows)."""
        identity = np.arange(self.rows)
        return not self.fills_for(self.own) and all(sizes[ref] == self.rows and np.array_equal(own, identity)
                                                   for ref, own in self.own.items())


def build_vocabulary(spec: TokenizerSpec, base: str | None, refs: list[str], files: Mapping[str, Mapping],
                     where: str, backend: str = "auto") -> Vocabulary | None:
    """The output tokenizer and every model's row map for ``spec`` (see the module's rules).

    Args:
        base: the recipe's base model (None without one); ``refs``: every model, recipe order.
        files: ref -> its carried files (name -> path or bytes).
        backend: how tokenizers are loaded (``tokenizer_files.load_tokenizer``): auto,
            tokenizers or transformers; the result is the same.
    Returns:
        A Vocabulary, or None for ``base`` when no model has tokenizer files (nothing to map).
    Raises:
        TokenizerError before any work, naming the model and what is missing or disagrees.
    """
    first = base if base is not None else refs[0]
    order = list(dict.fromkeys([first, *refs]))
    if spec.source == "base" and not any(_has_vocab(files[ref]) for ref in order) and not spec.tokens and not spec.pad_to_multiple_of:
        return None
    needed = order if spec.source == "union" else [first if spec.source == "base" else spec.source]
    for ref in needed:
        if not _has_vocab(files[ref]):
            raise TokenizerError(f"{where}: tokenizer source {'union' if spec.source == 'union' else spec.source}: "
                                 f"model {ref} has no tokenizer files (one of {', '.join(VOCAB_FILES)})")
    loaded = {ref: load_tokenizer(files[ref], ref, where, backend) for ref in order if _has_vocab(files[ref])}
    missing = [ref for ref in order if ref not in loaded]
    if missing:
        raise TokenizerError(f"{where}: model(s) {', '.join(missing)} have no tokenizer files, so their embedding rows "
                             f"cannot be matched to tokens (one of {', '.join(VOCAB_FILES)} is needed)")
    sizes = {ref: _vocab_size(files[ref], tok, ref, where) for ref, tok in loaded.items()}
    if spec.source == "union":
        _check_special_tokens(loaded, where)
    out_ref = first if spec.source in ("base", "union") else spec.source
    past = [t for t, i in loaded[out_ref].get_vocab().items() if i >= sizes[out_ref]]
    if spec.source in ("base", "union") and past:
        raise TokenizerError(f"{where}: the tokenizer of {out_ref} has {len(past)} token(s) with ids at or past its "
                             f"vocab_size {sizes[out_ref]} (e.g. {past[0]!r}); mergekit strips them from a BPE "
                             f"tokenizer, tsllm does not: remove them from its tokenizer first")
    out = load_tokenizer(files[out_ref], out_ref, where, backend)   # a fresh copy: tokens are added to it
    if spec.source == "union":
        _add_union_tokens(out, loaded, sizes, order)
    known = set(out.get_vocab())
    extra = [t for t in spec.tokens if t not in known]
    if extra:
        out.add_tokens(extra)
    vocab = out.get_vocab()
    tokens = len(vocab)
    if sorted(vocab.values()) != list(range(tokens)):
        raise TokenizerError(f"{where}: the output tokenizer (from {out_ref}) has gaps in its token ids; "
                             f"its embedding rows cannot be laid out")
    rows = tokens
    if spec.pad_to_multiple_of and rows % spec.pad_to_multiple_of:
        rows += spec.pad_to_multiple_of - rows % spec.pad_to_multiple_of
    own, vocabs = {}, {}
    for ref, tok in loaded.items():
        theirs = tok.get_vocab()
        vocabs[ref] = theirs
        mapped = np.full(rows, -1, dtype=np.int64)
        for token, new_id in vocab.items():
            old = theirs.get(token)
            if old is not None and old < sizes[ref]:
                mapped[new_id] = old
        own[ref] = mapped
    present = {ref: mapped.copy() for ref, mapped in own.items()}   # before forcing: who has which token
    for token, rule in spec.tokens.items():
        if rule.force:
            for mapped in own.values():
                mapped[vocab[token]] = -1
    changed = spec.source != "base" or extra or any(tokens != sizes[ref] for ref in order) or any(
        not np.array_equal(m[:tokens], np.arange(tokens)) for m in own.values())
    result = Vocabulary(tokens, rows, own, saved_files(out) if changed else None, spec.pad_to_multiple_of,
                        (spec, base, vocab, vocabs, sizes, where, present))
    result.fills_for(order)   # every rule checked now, before any work
    return result


def _fills(spec, base, order, vocab, own, vocabs, sizes, where) -> dict[int, tuple]:
    """Output id -> the rows averaged for it, for every token one of ``order`` lacks or that is forced."""
    fills = {}
    for token, new_id in vocab.items():
        rule = spec.tokens.get(token)
        having = [ref for ref in order if own[ref][new_id] >= 0]
        if not (rule and rule.force) and len(having) == len(order):
            continue
        here = f"{where}: token {token!r}"
        if rule is not None and rule.source is not None:
            src = rule.source
            if src.kind == "zero":
                fills[new_id] = ()
            elif src.kind == "model":
                if own[src.model][new_id] < 0:
                    raise TokenizerError(f"{here}: its source model {src.model} does not have this token")
                fills[new_id] = ((src.model, int(own[src.model][new_id])),)
            else:
                row = src.token_id if src.token is None else vocabs[src.model].get(src.token)
                if row is None or row >= sizes[src.model]:
                    what = f"token {src.token!r}" if src.token is not None else f"token_id {src.token_id}"
                    raise TokenizerError(f"{here}: model {src.model} has no {what} (vocab_size {sizes[src.model]})")
                fills[new_id] = ((src.model, int(row)),)
        elif len(having) == 1 or (base in having):
            donor = having[0] if len(having) == 1 else base
            fills[new_id] = ((donor, int(own[donor][new_id])),)
        elif not having:
            fills[new_id] = ()
        else:
            fills[new_id] = tuple((ref, int(own[ref][new_id])) for ref in having)
    return fills


def _add_union_tokens(out, loaded: dict, sizes: dict, order: list[str]) -> None:
    """Append to ``out`` the tokens of the other models that it lacks: ordinary ones (each
    model's id order), then added ones (first model's settings win)."""
    present = set(out.get_vocab())
    plain, added = [], {}
    for ref in order:
        tok = loaded[ref]
        special = {info.content: info for idx, info in tok.added_tokens_decoder.items() if idx < sizes[ref]}
        for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if idx < sizes[ref] and token not in present and token not in special and token not in plain:
                plain.append(token)
        for token, info in special.items():
            added.setdefault(token, info)
    new_added = [info for token, info in added.items() if token not in present and token not in plain]
    if plain:
        out.add_tokens(plain)
    if new_added:
        out.add_tokens(new_added)


def _check_special_tokens(loaded: dict, where: str) -> None:
    first_ref, first = next(iter(loaded.items()))
    for ref, tok in loaded.items():
        for attr in SPECIAL:
            mine, theirs = getattr(first, attr, None), getattr(tok, attr, None)
            if mine is not None and theirs is not None and str(mine) != str(theirs):
                raise TokenizerError(f"{where}: tokenizer union: {attr} is {str(mine)!r} in {first_ref} but {str(theirs)!r} "
                                     f"in {ref}; tokenizers that disagree on special tokens cannot be merged")


def _has_vocab(files: Mapping) -> bool:
    return any(name in files for name in VOCAB_FILES)


def _vocab_size(files: Mapping, tok, ref: str, where: str) -> int:
    """The model's ``config.json`` ``vocab_size`` (its embedding rows), else its tokenizer's length."""
    if "config.json" in files:
        try:
            size = json.loads(file_bytes(files["config.json"])).get("vocab_size")
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{where}: cannot read config.json of model {ref}: {e}") from None
        if isinstance(size, int) and size > 0:
            return size
    return len(tok.get_vocab())


def with_vocabulary(files: dict, vocab: Vocabulary | None) -> dict:
    """Carried ``files`` with the output tokenizer's files (the base's tokenizer files replaced)
    and ``config.json``'s ``vocab_size`` set to the output's rows; unchanged for None."""
    if vocab is None:
        return files
    out = dict(files)
    if vocab.files is not None:
        out = {name: entry for name, entry in out.items() if name not in TOKENIZER_FILES}
        out.update(vocab.files)
    if "config.json" in out:
        config = json.loads(file_bytes(out["config.json"]))
        if config.get("vocab_size") != vocab.rows:
            config["vocab_size"] = vocab.rows
            out["config.json"] = json.dumps(config, indent=2).encode()
    return out
