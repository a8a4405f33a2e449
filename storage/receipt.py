"""Shard receipts: what a finished shard holds (rows, bytes, sha256, fingerprint), written next to
it before it is renamed into place, and the checks of a shard on disk against its receipt."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ForeignShardError, IncompleteRunError, ShardCorruptError
from .fs import AnyPath, file_size, is_remote, location, open_binary, remote_error
from .layout import FORMAT_VERSION, receipt_path
from .shard_reader import ShardReader, is_out_of_files, out_of_files_error, redo_hint
from .spec import RunSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardReceipt:
    """What a finished shard holds; the manifest is the list of these plus the run spec."""

    name: str
    index: int
    num_shards: int
    rows: int
    tokens: int
    trained_tokens: int
    topk_mass_sum: float  # Σ over trained positions of the teacher mass inside the top k
    bytes: int
    sha256: str
    fingerprint: str
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ShardReceipt":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def sha256_file(path: AnyPath, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    try:
        f = open_binary(path)
    except OSError as e:
        if is_out_of_files(e):
            raise out_of_files_error(path, e) from e
        raise
    try:
        with f:
            while block := f.read(chunk):
                h.update(block)
    except OSError as e:
        if is_remote(path):  # the store went away mid-read: say so, never "corrupt"
            raise remote_error(path, e, "read") from e
        raise
    return h.hexdigest()


def receipt_for(shard: AnyPath, spec: RunSpec) -> ShardReceipt:
    """The receipt of a complete shard, checked against the file; rebuilt from the file if lost."""
    shard = location(shard)
    rpath = receipt_path(shard)
    size = file_size(shard)
    if rpath.exists():
        try:
            receipt = ShardReceipt.from_dict(json.loads(rpath.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ShardCorruptError(f"{rpath}: damaged receipt ({e!r}). {redo_hint(shard)}") from e
        if receipt.fingerprint != spec.fingerprint:
            raise ForeignShardError(
                f"{shard}: belongs to another run (fingerprint {receipt.fingerprint}, "
                f"this run {spec.fingerprint}). Move it out, or {redo_hint(shard).lower()}"
            )
        if receipt.bytes != size:
            raise ShardCorruptError(
                f"{shard}: {size} bytes on disk, its receipt says {receipt.bytes}: "
                f"the file was truncated or altered. {redo_hint(shard)}"
            )
        return receipt
    log.warning("%s: receipt missing, rebuilding it from the file", shard)
    reader = ShardReader(shard, expect_fingerprint=spec.fingerprint)
    if reader.stats is None:
        raise ShardCorruptError(f"{shard}: no receipt and no stats in the file. {redo_hint(shard)}")
    return ShardReceipt(
        name=shard.name,
        index=reader.index,
        num_shards=reader.num_shards,
        bytes=size,
        sha256=sha256_file(shard),
        fingerprint=spec.fingerprint,
        **reader.stats,
    )


def check_size(path: AnyPath, receipt: ShardReceipt) -> None:
    """The cheap check (one stat, no open file): the shard is there with the size the manifest lists."""
    path = location(path)
    try:
        size = file_size(path)
    except FileNotFoundError:
        raise_missing(path, receipt.index)
    if size != receipt.bytes:
        raise ShardCorruptError(
            f"{path}: {size} bytes on disk, the manifest says {receipt.bytes}: truncated or replaced. {redo_hint(path)}"
        )


def check_checksum(path: AnyPath, receipt: ShardReceipt) -> None:
    """Reads the whole file: its sha256 must be the manifest's."""
    digest = sha256_file(path)
    if digest != receipt.sha256:
        raise ShardCorruptError(
            f"{path}: checksum mismatch (sha256 {digest[:12]}…, manifest "
            f"{receipt.sha256[:12]}…): the file is corrupt. {redo_hint(path)}"
        )


def verify_shard(path: AnyPath, receipt: ShardReceipt, spec: RunSpec, *, checksum: bool) -> None:
    """Raise a specific StorageError if the shard on disk is not the one the manifest lists: size, footer and
    metadata, and (with `checksum`) the sha256 of the whole file. Readers of a whole run do these checks lazily,
    shard by shard as they first read one (`RunReader`); this is the eager form for a single shard."""
    path = location(path)
    check_size(path, receipt)
    ShardReader(path, expect_fingerprint=spec.fingerprint, cache_row_groups=0).close()  # footer and metadata
    if checksum:
        check_checksum(path, receipt)


def raise_missing(path: Path, index: int):
    raise IncompleteRunError(
        f"{path}: shard {index} listed in the manifest is missing. "
        f"Re-run `pipeline teacher --shard-index {index}` into this run directory"
    )


__all__ = [
    "ShardReceipt",
    "sha256_file",
    "receipt_for",
    "verify_shard",
    "check_size",
    "check_checksum",
    "raise_missing",
]
