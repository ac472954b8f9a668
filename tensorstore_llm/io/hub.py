"""Hugging Face Hub repos through huggingface-hub: revision pinned, local cache, offline-capable.

Only safetensors weights and small config / tokenizer files are fetched; with ``HF_HUB_OFFLINE=1``
the local cache alone answers, and a missing revision is a clear error rather than a download.
"""
from __future__ import annotations

import os
import re

from ..errors import HubUnavailable, RefError

HUB_PREFIX = "hf://"
REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
ALLOW_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def parse_hub_ref(ref: str) -> tuple[str, str | None] | None:
    """``hf://org/name@rev`` or ``org/name[@rev]`` -> (repo id, revision); None if not a hub ref.

    Raises:
        RefError: ``ref`` starts with ``hf://`` but names no repo (exit 3).
    Example:
        >>> parse_hub_ref("hf://org/model@v1")
        ('org/model', 'v1')
    """
    text = ref[len(HUB_PREFIX):] if ref.startswith(HUB_PREFIX) else ref
    repo, _, revision = text.partition("@")
    if REPO_RE.match(repo) and ".." not in repo:
        return repo, revision or None
    if ref.startswith(HUB_PREFIX):
        raise RefError(f"{ref!r} is not a hub reference; expected hf://org/name or hf://org/name@revision")
    return None


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for the local cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def snapshot(repo_id: str, revision: str | None = None) -> tuple[str, str]:
    """A local directory holding ``repo_id`` at ``revision`` and the commit hash it resolved to.

    Raises:
        HubUnavailable: the repo or revision cannot be had (offline and not cached, unknown, failed).
    """
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                 local_files_only=offline())
    except Exception as e:  # huggingface-hub raises many unrelated classes for "not available"
        hint = " (HF_HUB_OFFLINE is set: only the local cache is used)" if offline() else ""
        raise HubUnavailable(f"hub repo {repo_id}@{revision or 'main'}: cannot get it{hint}: {e.__class__.__name__}: {str(e).splitlines()[0][:200]}") from None
    return path, os.path.basename(os.path.normpath(path))
