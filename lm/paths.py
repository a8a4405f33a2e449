"""Is a name a local path or a Hugging Face hub id? One rule for models and corpora."""

from __future__ import annotations

import os

# Compression suffixes that `datasets` reads through (corpus.jsonl.gz is a .jsonl corpus).
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


def looks_like_local_path(name: str, *, file_suffixes: tuple[str, ...] = ()) -> bool:
    """True when `name` can only mean a local path (so a missing one is "not found", not a hub lookup).

    Hub ids are "name" or "owner/name"; anything absolute, relative (`.`, `~`), with a backslash or more than
    one slash is a path. `file_suffixes` adds what a caller knows to be file names (e.g. ".jsonl" for corpora;
    a trailing compression suffix such as ".gz" is looked through).
    """
    if os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1:
        return True
    if file_suffixes:
        stem, ext = os.path.splitext(name.lower())
        if ext in COMPRESSED_SUFFIXES:
            ext = os.path.splitext(stem)[1]
        return ext in file_suffixes
    return False
