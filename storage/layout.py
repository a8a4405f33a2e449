"""Names and constants of a run directory:

<run>/run.json                        the run spec (settings + fingerprint), written first
<run>/manifest.json                   spec + one entry per shard, written when all shards exist
<run>/shards/part-00000-of-00064.parquet           a complete shard (zstd Parquet)
<run>/shards/part-00000-of-00064.parquet.receipt.json   its receipt: rows, bytes, sha256, ...
"""

from __future__ import annotations

import re

from .fs import location

FORMAT_NAME = "label-anneal-shards"
# 2: each shard holds its own corpus range packed on its own (lm/corpus.py "Shards"); the file format is
# that of 1, so runs of either version are read, but a run directory never mixes them (the version is in
# the run spec and its fingerprint), and `pipeline teacher` writes 2 only.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
META_PREFIX = "label_anneal."
RUN_SPEC = "run.json"
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
RECEIPT_SUFFIX = ".receipt.json"
_SHARD_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.parquet$")


def shard_name(index: int, num_shards: int) -> str:
    return f"part-{index:05d}-of-{num_shards:05d}.parquet"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    m = _SHARD_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def shard_path(run_dir, index: int, num_shards: int):
    """A Path, or a storage.fs.RemotePath for a run directory given as a URI."""
    return location(run_dir) / SHARD_DIR / shard_name(index, num_shards)


def receipt_path(shard):
    return shard.with_name(shard.name + RECEIPT_SUFFIX)
