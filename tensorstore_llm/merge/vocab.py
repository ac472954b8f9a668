"""Embedding and LM-head rows laid out in the output vocabulary, streamed like every other tensor.

A :class:`VocabView` shows one model through its token map (``merge/tokenizer.py``): its
vocabulary tensors (roles ``embed`` and ``lm_head``; tied models have only the embedding) get
the output's rows, each block gathered by index from the model's own rows, the tokens it lacks
filled by the stated rule (rows of other models, averaged in fp32, or zeros), padding rows set to
the model's mean row; every other tensor passes through. The engine reads views by rows as it
reads any source, so a merge over different vocabularies keeps ``--max-memory``: a block of k
output rows holds, besides itself, at most one read of about k rows of a model it draws from
(``io.gather.gather_rows``, which the engine's GATHER inputs use too). The fill rules and the
padding rows are more than a gather, so they live here, in a view, as ``slices.LayerView``
renames layers.

The padding mean needs every real row first: :func:`vocabulary_views` asks the engine for it as
a reduction job (op ``row_mean``) over the unpadded views, under the run's memory budget.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

import numpy as np
import torch

from ..arch import FAMILIES, Architecture
from ..dtypes import by_name
from ..errors import FormatError, ShapeMismatch, TokenizerError
from ..io.gather import gather_rows
from .tokenizer import Vocabulary


def vocab_tensor_names(names, config: dict | None) -> list[str]:
    """The tensors of ``names`` whose rows are tokens: the ``embed`` and ``lm_head`` roles of the
    model's family (from ``config``), else names ending in embed_tokens.weight / lm_head.weight."""
    arch = None
    if config and config.get("model_type") in FAMILIES:
        try:
            arch = Architecture.from_config(config)
        except (FormatError, KeyError, TypeError, ValueError):   # an unusual config: fall back to the names
            arch = None
    if arch is not None:
        return [n for n in names if arch.role(n).role in ("embed", "lm_head") and arch.role(n).kind == "weight"]
    return [n for n in names if n.endswith(("embed_tokens.weight", "lm_head.weight"))]


class VocabView:
    """Model ``ref`` (``source``) with its vocabulary tensors in the output vocabulary; ``sources``
    holds every model (fills read from them); ``means`` name -> fp32 mean row for padding rows;
    ``contributors(name)`` the models merged into tensor ``name`` (default: all), whose rows
    the fill rules choose from."""

    def __init__(self, source, ref: str, vocab: Vocabulary, names: list[str], sources: Mapping, means=None,
                 padded: bool = True, contributors=None):
        self.source, self.ref, self.vocab, self.sources = source, ref, vocab, sources
        self.names, self.means, self.padded = set(names), dict(means or {}), padded
        self.fills = {name: vocab.fills_for(contributors(name) if contributors else list(vocab.own)) for name in self.names}
        self.rows = vocab.rows if padded else vocab.tokens
        self.path = getattr(source, "path", None)
        digest = hashlib.sha256(vocab.own[ref].tobytes() + repr(sorted((n, sorted(f.items())) for n, f in self.fills.items())).encode()
                                + repr(sorted((k, v) for k, v in self.means.items())).encode()).hexdigest()[:16]
        self.identity = f"{source.identity}|vocab[{self.rows}]:{digest}"
        for name in self.names:
            have = source.meta(name).rows
            mapped = vocab.own[ref]
            if mapped.max(initial=-1) >= have:
                raise ShapeMismatch(f"tensor {name!r} of model {ref} has {have} rows, but its tokenizer / config "
                                    f"vocab_size ({int(mapped.max()) + 1} rows used) says more")
        for name, fills in self.fills.items():
            highest: dict[str, int] = {}
            for fill in fills.values():
                for donor, row in fill:
                    highest[donor] = max(highest.get(donor, -1), row)
            for donor, row in highest.items():
                have = sources[donor].meta(name).rows
                if row >= have:
                    raise TokenizerError(f"token row {row} of model {donor} is past its tensor {name!r} ({have} rows)")

    def keys(self) -> list[str]:
        return list(self.source.keys())

    def meta(self, name: str):
        meta = self.source.meta(name)
        if name not in self.names:
            return meta
        return dataclasses.replace(meta, shape=(self.rows, *meta.shape[1:]))

    def read(self, name: str):
        meta = self.meta(name)
        return self.read_rows(name, 0, meta.rows).reshape(meta.shape)

    def read_rows(self, name: str, start: int, stop: int):
        """Rows ``start:stop`` in the output vocabulary: own rows gathered, fills computed, padding
        rows the mean row; in the model's stored dtype."""
        if name not in self.names:
            return self.source.read_rows(name, start, stop)
        meta = self.source.meta(name)
        stop = min(stop, self.rows)
        out = torch.zeros((stop - start, *meta.shape[1:]), dtype=by_name(meta.dtype).torch)
        mapped = self.vocab.own[self.ref][start:stop]
        mine = np.nonzero(mapped >= 0)[0]
        gather_rows(self.source, name, mapped[mine], out, mine)
        tokens = self.vocab.tokens
        filled = [i for i in np.nonzero(mapped < 0)[0].tolist() if start + i < tokens]
        if filled:
            self._fill(name, out, start, filled)
        if stop > tokens:
            pad = max(start, tokens) - start
            out[pad:] = torch.tensor(self.means[name], dtype=torch.float32).reshape(meta.shape[1:]).to(out.dtype)
        return out

    def _fill(self, name: str, out: torch.Tensor, start: int, filled: list[int]) -> None:
        wanted: dict[str, list[int]] = {}
        for i in filled:
            for donor, row in self.fills[name].get(start + i, ()):
                wanted.setdefault(donor, []).append(row)
        rows = {}
        for donor, index in wanted.items():
            index = np.array(sorted(set(index)), dtype=np.int64)
            block = gather_rows(self.sources[donor], name, index).float()
            rows[donor] = {int(r): block[k] for k, r in enumerate(index)}
        for i in filled:
            fill = self.fills[name].get(start + i, ())
            if not fill:
                continue
            total = None
            for donor, row in fill:
                total = rows[donor][row].clone() if total is None else total + rows[donor][row]
            out[i] = (total / len(fill) if len(fill) > 1 else total).to(out.dtype)

    def preferred_rows(self, name: str) -> int:
        return 1

    def close(self) -> None:
        """Nothing: the underlying sources belong to the caller."""


def vocabulary_views(vocab: Vocabulary, sources: Mapping, configs: Mapping[str, dict], options, where: str,
                     contributors=None) -> dict:
    """``sources`` (ref -> TensorSource) with every model seen through its token map; the padding
    means come from reduction jobs run under ``options`` (a RunOptions); ``contributors(name)``:
    the models merged into tensor ``name`` (default: all). Unchanged sources when every model's
    rows already are the output's."""
    from ..engine.executor import Executor
    from ..engine.plan import InputRef, Plan, TensorJob

    names = {ref: vocab_tensor_names(src.keys(), configs.get(ref)) for ref, src in sources.items()}
    sizes = {ref: source.meta(n).rows for ref, source in sources.items() for n in names[ref][:1]}
    if all(ref in sizes for ref in sources) and vocab.unchanged(sizes):
        return dict(sources)
    for ref, found in names.items():
        if not found:
            raise TokenizerError(f"{where}: model {ref} has no embedding / lm_head tensor to lay out in the merged vocabulary")
    means: dict[str, dict] = {ref: {} for ref in sources}
    if vocab.rows > vocab.tokens:
        unpadded = {ref: VocabView(src, ref, vocab, names[ref], sources, padded=False, contributors=contributors)
                    for ref, src in sources.items()}
        jobs, owners = [], []
        for ref, view in unpadded.items():
            for name in names[ref]:
                meta = dataclasses.replace(view.meta(name), name=f"{len(jobs)}:{name}")   # a record name per model
                jobs.append(TensorJob(meta, "row_mean", (("x", InputRef(ref, name)),), reduce_only=True))
                owners.append((ref, name))
        executor = Executor(Plan(jobs, unpadded), None, device=options.device, max_memory=options.max_memory,
                            progress=options.progress, desc="vocabulary padding")
        executor.run()
        for job, (ref, name) in zip(jobs, owners):
            means[ref][name] = executor.records[job.output.name]["mean"]
    return {ref: VocabView(src, ref, vocab, names[ref], sources, means[ref], contributors=contributors)
            for ref, src in sources.items()}


def merged_vocabulary(recipe, sources: Mapping, files_of: Mapping[str, Mapping], files: dict, where: str,
                      options) -> tuple[dict, dict]:
    """The recipe's ``tokenizer_source`` / ``tokenizer:`` applied: (sources seen through their token
    maps, the output's carried ``files`` with the output tokenizer, ``vocab_size`` and the recipe's
    chat template). Everything is checked before any merge work; a recipe without tokenizer
    settings gets ``sources`` and ``files`` back unchanged.

    Args:
        recipe: a parsed MergeRecipe; ``files_of``: ref -> that model's carried files;
        ``files``: the output's carried files so far (the base's); ``options``: a RunOptions.
    Example:
        >>> sources, files = merged_vocabulary(recipe, sources, files_of, files, "r.yaml", RunOptions())  # doctest: +SKIP
    """
    import json

    from ..engine.memory import release_free_heap
    from .card import with_chat_template
    from .tokenizer import build_vocabulary, file_bytes, with_vocabulary

    spec = getattr(recipe, "tokenizer", None)
    if spec is None:
        return dict(sources), files
    refs = list(dict.fromkeys(([recipe.base] if recipe.base else []) + [m.ref for m in recipe.models]))
    vocab = build_vocabulary(spec, recipe.base, refs, files_of, where)
    release_free_heap()   # the loaded tokenizers are gone: ~60 MiB of free heap on 49k-token vocabularies
    if vocab is None:
        return dict(sources), files
    configs = {}
    for ref in refs:
        entry = files_of[ref].get("config.json")
        if entry is not None:
            configs[ref] = json.loads(file_bytes(entry))
    views = vocabulary_views(vocab, {ref: sources[ref] for ref in refs}, configs, options, where,
                             _slice_contributors(recipe) if recipe.slices else None)
    out = with_vocabulary(files, vocab)
    if vocab.files is not None:
        out = with_chat_template(out, recipe.chat_template, [files_of[ref] for ref in refs], where)
    return {**sources, **views}, out


def _slice_contributors(recipe):
    """As slices.py: a sliced recipe's embeddings merge the first slice's models, the rest the last's."""
    first, last = ([s.ref for s in recipe.slices[i].sources] for i in (0, -1))

    def contributors(name: str) -> list[str]:
        return list(dict.fromkeys(first if "embed" in name else last))
    return contributors
