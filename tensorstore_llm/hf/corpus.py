"""Corpus reading: plain text, JSONL (``text`` or chat ``messages``) and Parquet text columns.

A corpus is a file or a directory of files; each yields a list of *documents* (strings). The
format is chosen by extension unless given:

- ``.txt`` / ``.md``: documents are separated by blank lines *twice* (``"\\n\\n\\n"``) if the
  file contains that separator, otherwise the whole file is one document;
- ``.jsonl``: one JSON object per line with a ``text`` field, or a ``messages`` list of
  ``{"role", "content"}`` dicts rendered by the tokenizer's chat template (as the tokenizer of
  the teacher renders it, so the student must use the same template: it is fingerprinted);
- ``.parquet``: a string column (``text`` unless ``text_field`` says otherwise).

The corpus fingerprint is the sha256 of the files' relative names and bytes, in name order.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from ..errors import DatasetMismatch, FormatError

FORMATS = ("text", "jsonl", "parquet")
TEXT_SEPARATOR = "\n\n\n"
_EXTENSIONS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True)
class Corpus:
    """Documents of a corpus and what identifies it.

    Attributes:
        documents: the document strings, in file order then line / row order.
        fingerprint: sha256 over the files' names and bytes (see the module docstring).
        files: the files read, relative to ``root``.
        chat: True when documents were rendered from chat ``messages`` with a chat template.
        chat_template_sha: sha256 of the chat template used ('' when none was used).
    """

    root: str
    documents: list[str]
    fingerprint: str
    files: list[str]
    chat: bool = False
    chat_template_sha: str = ""


def corpus_files(path: str) -> list[str]:
    """The corpus files under ``path`` (a file, or a directory walked recursively), sorted.

    Raises DatasetMismatch when the path does not exist or holds no readable corpus file.
    """
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DatasetMismatch(f"corpus {path!r} does not exist")
    found = []
    for folder, _, names in os.walk(path):
        for name in names:
            if os.path.splitext(name)[1].lower() in _EXTENSIONS:
                found.append(os.path.join(folder, name))
    if not found:
        raise DatasetMismatch(f"corpus directory {path!r} holds no .txt, .md, .jsonl or .parquet file")
    return sorted(found)


def read_corpus(path: str, *, format: str | None = None, text_field: str = "text",
                messages_field: str = "messages", tokenizer=None) -> Corpus:
    """Read every document of a corpus file or directory.

    Args:
        path: a file or a directory of corpus files.
        format: 'text', 'jsonl' or 'parquet'; by default from each file's extension.
        text_field: the JSONL field / Parquet column holding the text.
        messages_field: the JSONL field holding chat messages (rendered with ``tokenizer``).
        tokenizer: a transformers tokenizer; required for chat corpora, which it renders with
            ``apply_chat_template(messages, tokenize=False)``.
    Returns:
        A :class:`Corpus`. Empty documents (after stripping whitespace) are skipped.
    Raises:
        DatasetMismatch: empty corpus; chat messages but no tokenizer or no chat template.
        FormatError: a malformed line or missing field / column.

    Example:
        >>> corpus = read_corpus("data/corpus/docstrings.jsonl")   # doctest: +SKIP
        >>> len(corpus.documents) > 0                              # doctest: +SKIP
        True
    """
    files = corpus_files(path)
    root = path if os.path.isdir(path) else os.path.dirname(path)
    digest = hashlib.sha256()
    documents: list[str] = []
    chat = False
    for file in files:
        kind = format or _EXTENSIONS.get(os.path.splitext(file)[1].lower())
        if kind not in FORMATS:
            raise FormatError(f"{file}: unknown corpus format {kind!r}; expected one of {', '.join(FORMATS)}")
        rel = os.path.relpath(file, root)
        digest.update(rel.encode() + b"\x00")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if kind == "text":
            documents += _read_text(file)
        elif kind == "jsonl":
            docs, used_chat = _read_jsonl(file, text_field, messages_field, tokenizer)
            documents += docs
            chat = chat or used_chat
        else:
            documents += _read_parquet(file, text_field)
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise DatasetMismatch(f"corpus {path!r} is empty: no non-blank document in {len(files)} file(s)")
    template_sha = hashlib.sha256(tokenizer.chat_template.encode()).hexdigest() if chat else ""
    return Corpus(root, documents, digest.hexdigest(), [os.path.relpath(f, root) for f in files], chat, template_sha)


def _read_text(file: str) -> list[str]:
    with open(file, encoding="utf-8") as f:
        text = f.read()
    return text.split(TEXT_SEPARATOR) if TEXT_SEPARATOR in text else [text]


def _read_jsonl(file: str, text_field: str, messages_field: str, tokenizer) -> tuple[list[str], bool]:
    docs, chat = [], False
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{file}:{number}: not a JSON object ({e.msg})") from None
            if isinstance(record, dict) and isinstance(record.get(text_field), str):
                docs.append(record[text_field])
            elif isinstance(record, dict) and isinstance(record.get(messages_field), list):
                docs.append(render_chat(record[messages_field], tokenizer, f"{file}:{number}"))
                chat = True
            else:
                raise FormatError(f"{file}:{number}: expected a {text_field!r} string or a {messages_field!r} list")
    return docs, chat


def render_chat(messages: list, tokenizer, where: str = "chat corpus") -> str:
    """One chat conversation as text, rendered by ``tokenizer``'s chat template.

    Raises DatasetMismatch when there is no tokenizer or it has no chat template.
    """
    if tokenizer is None:
        raise DatasetMismatch(f"{where}: chat messages need a tokenizer with a chat template to be rendered")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DatasetMismatch(f"{where}: the corpus holds chat messages but tokenizer {name!r} has no chat "
                              f"template; give a tokenizer with one, or convert the corpus to plain text")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise FormatError(f"{where}: each message must be {{'role': str, 'content': str}}")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _read_parquet(file: str, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    schema = pq.read_schema(file)
    if text_field not in schema.names:
        raise FormatError(f"{file}: no column {text_field!r}; columns are {', '.join(schema.names)}")
    column = pq.read_table(file, columns=[text_field]).column(text_field)
    return [v for v in column.to_pylist() if isinstance(v, str)]
