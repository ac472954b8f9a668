"""Packing documents into fixed-length token sequences, by one documented, fingerprinted rule.

Rule ``concat-eos-chunk-v1`` (the only one so far):

1. Documents are taken in corpus order, or, when ``shuffle_seed`` is not None, in the order of a
   permutation drawn from NumPy's SFC64 seeded with
   ``seeding.seed_value(shuffle_seed, "pack", "documents")``.
2. Each document is tokenised without special tokens (``add_special_tokens=False``), optionally
   preceded by BOS (``add_bos``), and always followed by one EOS token. ``add_bos=None`` (the
   default) means "as the tokenizer itself does": BOS when the tokenizer puts one before a plain
   text (Gemma, Llama 3; not SmolLM2) and no document already starts with the BOS token's text
   (a chat template that writes it). Gemma scores text without BOS far worse (mean NLL 4.86 vs
   2.87 nats on ``data/corpus``), so a teacher must see what it was trained on. The resolved
   value is what the rule records and fingerprints.
3. The token streams are concatenated and cut into consecutive windows of ``seq_len`` tokens;
   documents run across window boundaries; the final partial window is dropped. The teacher
   attends across document boundaries inside a window (plain causal attention, no per-document
   mask), so a student should be trained the same way.

For cross-tokenizer students each sequence also has a *text* and per-token character offsets
into it: the text is the concatenation of the document pieces the sequence covers, where each
EOS token spans a ``"\\n\\n"`` separator (BOS spans nothing). Tokenising that text with another
tokenizer and aligning by offsets (``distill.align``) maps its tokens onto the teacher's.

A sequence's packing is identified by :meth:`Packing.fingerprint`: the rule, its parameters,
and the tokenizer and corpus fingerprints. A reader refuses a cache whose fingerprint differs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..errors import DatasetMismatch
from ..seeding import seed_value

PACKING_RULE = "concat-eos-chunk-v1"
EOS_TEXT = "\n\n"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides a tokenizer's output: its model, normaliser, pre-tokeniser,
    special tokens, vocabulary size and chat template (padding / truncation settings excluded).

    Example:
        >>> tokenizer_fingerprint(tok) == tokenizer_fingerprint(tok)   # doctest: +SKIP
        True
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = sorted(tokenizer.get_vocab().items())
    payload = {
        "tokenizer": spec,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "len": len(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None) or "",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class PackingRule:
    """Parameters of the packing rule (see the module docstring); part of every fingerprint."""

    seq_len: int = 2048
    shuffle_seed: int | None = 0
    add_bos: bool | None = None     # None: as the tokenizer does (resolved by Packing)
    rule: str = PACKING_RULE

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved(self, tokenizer, documents: list[str]) -> PackingRule:
        """This rule with ``add_bos`` decided: kept when given; when None, True exactly when
        :func:`tokenizer_adds_bos` and no document already starts with the BOS token's text."""
        if self.add_bos is not None:
            return self
        bos_text = tokenizer.bos_token if tokenizer.bos_token_id is not None else None
        add = tokenizer_adds_bos(tokenizer) and not any(bos_text and d.startswith(str(bos_text)) for d in documents)
        return replace(self, add_bos=add)


def tokenizer_adds_bos(tokenizer) -> bool:
    """True when ``tokenizer`` itself starts a plain text with its BOS token (its
    ``add_special_tokens=True`` encoding of "a" begins with ``bos_token_id``).

    Example:
        >>> tokenizer_adds_bos(gemma_tokenizer), tokenizer_adds_bos(smollm2_tokenizer)   # doctest: +SKIP
        (True, False)
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


class Packing:
    """A corpus packed into ``[num_sequences, seq_len]`` int32 token ids, with offsets on demand.

    Attributes:
        sequences: int32 array [num_sequences, seq_len].
        rule: the :class:`PackingRule`.
        eos_id / bos_id: the special ids used.
    """

    def __init__(self, documents: list[str], tokenizer, rule: PackingRule, corpus_fingerprint: str = ""):
        if rule.seq_len < 2:
            raise DatasetMismatch(f"seq_len must be at least 2, got {rule.seq_len}")
        if not documents:
            raise DatasetMismatch("cannot pack an empty corpus")
        rule = rule.resolved(tokenizer, documents)
        self.rule = rule
        self.corpus_fingerprint = corpus_fingerprint
        self.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise DatasetMismatch("the tokenizer has no EOS token; packing needs one to mark document ends")
        self.bos_id = tokenizer.bos_token_id if rule.add_bos else None
        if rule.add_bos and self.bos_id is None:
            raise DatasetMismatch("add_bos was asked but the tokenizer has no BOS token")
        order = np.arange(len(documents))
        if rule.shuffle_seed is not None:
            order = np.random.Generator(np.random.SFC64(seed_value(rule.shuffle_seed, "pack", "documents"))).permutation(len(documents))
        self.documents = [documents[i] for i in order]
        self._tokenise(tokenizer)
        total = len(self.stream)
        count = total // rule.seq_len
        if count == 0:
            raise DatasetMismatch(f"the corpus packs into {total} tokens ({len(documents)} documents), fewer than "
                                  f"one sequence of seq_len={rule.seq_len}; use a shorter --seq-len or more text")
        self.sequences = self.stream[: count * rule.seq_len].reshape(count, rule.seq_len)

    def _tokenise(self, tokenizer) -> None:
        fast = getattr(tokenizer, "is_fast", False)
        encoded = tokenizer(self.documents, add_special_tokens=False, return_offsets_mapping=fast,
                            return_attention_mask=False)
        ids, docs, starts, ends = [], [], [], []
        for d, (text, tokens) in enumerate(zip(self.documents, encoded["input_ids"])):
            n = len(tokens)
            if fast:
                off = np.asarray(encoded["offset_mapping"][d], dtype=np.int64).reshape(n, 2)
            else:
                off = np.full((n, 2), -1, dtype=np.int64)
            head = [self.bos_id] if self.bos_id is not None else []
            ids.append(np.asarray(head + list(tokens) + [self.eos_id], dtype=np.int32))
            lo = np.concatenate([[0] * len(head), off[:, 0], [len(text)]])
            hi = np.concatenate([[0] * len(head), off[:, 1], [len(text) + len(EOS_TEXT)]])
            starts.append(lo)
            ends.append(hi)
            docs.append(np.full(len(lo), d, dtype=np.int64))
        self.stream = np.concatenate(ids)
        self._doc = np.concatenate(docs)
        self._start = np.concatenate(starts)
        self._end = np.concatenate(ends)
        self.has_offsets = fast

    def __len__(self) -> int:
        return self.sequences.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.sequences.size)

    def fingerprint(self) -> str:
        """sha256 of the rule, its parameters, the tokenizer and the corpus fingerprints."""
        payload = {"packing": self.rule.to_dict(), "tokenizer": self.tokenizer_fingerprint,
                   "corpus": self.corpus_fingerprint, "eos": self.eos_id, "bos": self.bos_id}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def text_and_offsets(self, index: int) -> tuple[str, np.ndarray]:
        """The text of sequence ``index`` and its tokens' [seq_len, 2] int32 character offsets.

        Each EOS token spans a "\\n\\n" separator in the text; BOS spans nothing.
        Raises DatasetMismatch for a slow (non-Rust) tokenizer, which gives no offsets.
        """
        if not self.has_offsets:
            raise DatasetMismatch("character offsets need a fast (Rust) tokenizer")
        L = self.rule.seq_len
        sl = slice(index * L, (index + 1) * L)
        doc, start, end = self._doc[sl], self._start[sl], self._end[sl]
        pieces, offsets, base = [], np.zeros((L, 2), dtype=np.int64), 0
        for d in np.unique(doc):   # docs appear in increasing order within a sequence
            sel = doc == d
            text = self.documents[int(d)] + EOS_TEXT
            lo, hi = int(start[sel].min()), int(end[sel].max())
            pieces.append(text[lo:hi])
            offsets[sel, 0] = start[sel] - lo + base
            offsets[sel, 1] = end[sel] - lo + base
            base += hi - lo
        return "".join(pieces), offsets.astype(np.int32)
