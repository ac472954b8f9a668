"""mergekit's tokenizer settings: ``tokenizer_source`` (``base``, ``union`` or a model of the
recipe) and the ``tokenizer:`` block (``source``, default ``union`` as in mergekit; ``tokens``
with a per-token ``source`` / ``force``; ``pad_to_multiple_of``). ``merge/tokenizer_settings.py``
reads them (its names are re-exported here); this module builds the output tokenizer and, for
each model, the map from output token ids to its embedding rows; ``merge/vocab.py`` streams the
embedding and LM-head rows through those maps.

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

import numpy as np

from ..errors import TokenizerError
from .tokenizer_files import (
    TOKENIZER_FILES,
    VOCAB_FILES,
    file_bytes,
    load_tokenizer,
    saved_files,
)
from .tokenizer_settings import (  # noqa: F401 (re-exported)
    TokenizerSpec,
    TokenRule,
    TokenSource,
    parse_tokenizer_settings,
)

__all__ = ["TOKENIZER_FILES", "VOCAB_FILES", "TokenizerSpec", "Vocabulary", "build_vocabulary", "file_bytes",
           "parse_tokenizer_settings", "with_vocabulary"]
SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


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
