"""Read shards: random access by row, streaming by row group, with validation on open."""
from __future__ import annotations

import bisect
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .codec import Encoding, decode_positions
from .errors import ForeignShardError, FormatVersionError, ShardCorruptError
from .layout import FORMAT_VERSION, META_PREFIX, receipt_path
from .manifest import Manifest, RunSpec, load_manifest
from .writer import ShardReceipt, sha256_file

log = logging.getLogger(__name__)


@dataclass
class SequenceLabels:
    """One stored sequence. Position t predicts input_ids[t+1]; only positions with label_mask set
    carry teacher labels, in order."""

    sample_id: int
    input_ids: np.ndarray      # int32 (T,)
    label_mask: np.ndarray     # bool (T-1,)
    topk_ids: np.ndarray       # int32 (n, k), n = label_mask.sum(), sorted by descending log-prob
    topk_logprobs: np.ndarray  # float32 (n, k)
    tail_logprob: np.ndarray   # float32 (n,) log of the teacher mass outside the top k
    # Sampled runs only: (n, k) uint16 draws per entry (0 for exact head entries and padding).
    # In variable runs (top-p, sampled) positions are padded to k with id -1 and log-prob -inf.
    sample_counts: np.ndarray | None = None


def _redo(path: Path) -> str:
    return (f"Delete {path} (and its receipt) and re-run `pipeline teacher` for that shard index; "
            f"the other shards are unaffected")


def _flat(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


class ShardReader:
    """One shard file. Checks the Parquet footer and the key-value metadata on open."""

    def __init__(self, path: Path, *, expect_fingerprint: str | None = None, cache_row_groups: int = 4):
        self.path = Path(path)
        self.cache_row_groups = max(1, cache_row_groups)
        try:
            self._pf = pq.ParquetFile(self.path)
        except FileNotFoundError:
            raise
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardCorruptError(f"{self.path}: not a readable Parquet file ({e}); it is truncated or "
                                    f"corrupt. {_redo(self.path)}") from e
        raw = self._pf.metadata.metadata or {}  # file-level: includes what was added at close
        meta = {k.decode()[len(META_PREFIX):]: v.decode() for k, v in raw.items()
                if k.decode().startswith(META_PREFIX)}
        if "fingerprint" not in meta:
            raise ForeignShardError(f"{self.path}: not a label-anneal shard (no fingerprint in its metadata)")
        if int(meta.get("format_version", -1)) != FORMAT_VERSION:
            raise FormatVersionError(f"{self.path}: shard format version {meta.get('format_version')}, "
                                     f"this label-anneal reads {FORMAT_VERSION}")
        self.fingerprint = meta["fingerprint"]
        if expect_fingerprint is not None and self.fingerprint != expect_fingerprint:
            raise ForeignShardError(
                f"{self.path}: belongs to another run (fingerprint {self.fingerprint}, this run "
                f"{expect_fingerprint}). Move it out of the run directory, or {_redo(self.path).lower()}")
        self.k = int(meta["k"])
        self.vocab_size = int(meta["vocab_size"])
        self.encoding = Encoding.from_dict(json.loads(meta["encoding"]))
        self.index, self.num_shards = int(meta["shard_index"]), int(meta["num_shards"])
        self.stats = json.loads(meta["stats"]) if "stats" in meta else None
        self.variable = meta.get("variable", "0") == "1"
        self.sampled = meta.get("sampled", "0") == "1"
        md = self._pf.metadata
        self.num_rows = md.num_rows
        self._rg_starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        self._cache: OrderedDict[int, list[SequenceLabels]] = OrderedDict()

    def __len__(self) -> int:
        return self.num_rows

    def _decode(self, table: pa.Table) -> list[SequenceLabels]:
        sid = table.column("sample_id").to_numpy()
        inp, inp_off = _flat(table.column("input_ids"))
        mask, mask_off = _flat(table.column("label_mask"))
        ids, _ = _flat(table.column("topk_ids"))
        lps, _ = _flat(table.column("topk_logprobs"))
        tail, tail_off = _flat(table.column("tail_logprob"))
        counts = _flat(table.column("label_counts"))[0].astype(np.int64) if self.variable else None
        ids, lps, tail = decode_positions(ids, lps, tail, self.k, self.encoding, counts)
        draws = None
        if self.sampled:
            flat_draws, _ = _flat(table.column("sample_counts"))
            draws = np.zeros(ids.shape, dtype=np.uint16)
            draws[np.arange(self.k)[None, :] < counts[:, None]] = flat_draws
        out = []
        for r in range(len(sid)):
            a, b = tail_off[r], tail_off[r + 1]
            out.append(SequenceLabels(
                sample_id=int(sid[r]), input_ids=inp[inp_off[r]:inp_off[r + 1]].astype(np.int32, copy=False),
                label_mask=mask[mask_off[r]:mask_off[r + 1]].astype(bool, copy=False),
                topk_ids=ids[a:b], topk_logprobs=lps[a:b], tail_logprob=tail[a:b],
                sample_counts=None if draws is None else draws[a:b]))
        return out

    def read_row_group(self, i: int) -> list[SequenceLabels]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        try:
            rows = self._decode(self._pf.read_row_group(i))
        except (pa.ArrowInvalid, OSError, ValueError) as e:
            raise ShardCorruptError(f"{self.path}: row group {i} cannot be decoded ({e}). {_redo(self.path)}") from e
        self._cache[i] = rows
        if len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return rows

    def row_group_bounds(self) -> list[tuple[int, int]]:
        """[start, stop) row ranges of the row groups: the unit of efficient reading."""
        s = self._rg_starts
        return [(int(s[i]), int(s[i + 1])) for i in range(len(s) - 1)]

    def __getitem__(self, row: int) -> SequenceLabels:
        if not 0 <= row < self.num_rows:
            raise IndexError(f"{self.path.name}: row {row} out of range 0..{self.num_rows - 1}")
        g = int(np.searchsorted(self._rg_starts, row, side="right") - 1)
        return self.read_row_group(g)[row - self._rg_starts[g]]

    def __iter__(self) -> Iterator[SequenceLabels]:
        for g in range(len(self._rg_starts) - 1):
            yield from self.read_row_group(g)


def receipt_for(shard: Path, spec: RunSpec) -> ShardReceipt:
    """The receipt of a complete shard, checked against the file; rebuilt from the file if lost."""
    shard = Path(shard)
    rpath = receipt_path(shard)
    size = os.path.getsize(shard)
    if rpath.exists():
        try:
            receipt = ShardReceipt.from_dict(json.loads(rpath.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ShardCorruptError(f"{rpath}: damaged receipt ({e!r}). {_redo(shard)}") from e
        if receipt.fingerprint != spec.fingerprint:
            raise ForeignShardError(f"{shard}: belongs to another run (fingerprint {receipt.fingerprint}, "
                                    f"this run {spec.fingerprint}). Move it out, or {_redo(shard).lower()}")
        if receipt.bytes != size:
            raise ShardCorruptError(f"{shard}: {size} bytes on disk, its receipt says {receipt.bytes}: "
                                    f"the file was truncated or altered. {_redo(shard)}")
        return receipt
    log.warning("%s: receipt missing, rebuilding it from the file", shard)
    reader = ShardReader(shard, expect_fingerprint=spec.fingerprint)
    if reader.stats is None:
        raise ShardCorruptError(f"{shard}: no receipt and no stats in the file. {_redo(shard)}")
    return ShardReceipt(name=shard.name, index=reader.index, num_shards=reader.num_shards,
                        bytes=size, sha256=sha256_file(shard), fingerprint=spec.fingerprint, **reader.stats)


def verify_shard(path: Path, receipt: ShardReceipt, spec: RunSpec, *, checksum: bool) -> None:
    """Raise a specific StorageError if the shard on disk is not the one the manifest lists."""
    path = Path(path)
    if not path.exists():
        raise_missing(path, receipt.index)
    size = os.path.getsize(path)
    if size != receipt.bytes:
        raise ShardCorruptError(f"{path}: {size} bytes on disk, the manifest says {receipt.bytes}: "
                                f"truncated or replaced. {_redo(path)}")
    ShardReader(path, expect_fingerprint=spec.fingerprint)  # footer and metadata
    if checksum:
        digest = sha256_file(path)
        if digest != receipt.sha256:
            raise ShardCorruptError(f"{path}: checksum mismatch (sha256 {digest[:12]}…, manifest "
                                    f"{receipt.sha256[:12]}…): the file is corrupt. {_redo(path)}")


def raise_missing(path: Path, index: int):
    from .errors import IncompleteRunError

    raise IncompleteRunError(f"{path}: shard {index} listed in the manifest is missing. "
                             f"Re-run `pipeline teacher --shard-index {index}` into this run directory")


class RunReader:
    """All rows of a finalised run, in shard order. `verify`: "checksum" (default: sha256 of every
    shard once, on open), "size" (sizes and footers only), or "none"."""

    def __init__(self, run_dir: Path, *, verify: str = "checksum"):
        if verify not in ("checksum", "size", "none"):
            raise ValueError(f"verify={verify!r}: choose checksum, size or none")
        self.run_dir = Path(run_dir)
        self.manifest: Manifest = load_manifest(self.run_dir)
        self.spec = self.manifest.spec
        self.paths = [self.run_dir / "shards" / s.name for s in self.manifest.shards]
        if verify != "none":
            for p, r in zip(self.paths, self.manifest.shards):
                verify_shard(p, r, self.spec, checksum=(verify == "checksum"))
        self._starts = [0]
        for s in self.manifest.shards:
            self._starts.append(self._starts[-1] + s.rows)
        self._readers: dict[int, ShardReader] = {}

    @property
    def k(self) -> int:
        return self.spec.k

    def __len__(self) -> int:
        return self._starts[-1]

    def shard(self, i: int) -> ShardReader:
        if i not in self._readers:
            r = ShardReader(self.paths[i], expect_fingerprint=self.spec.fingerprint)
            if r.num_rows != self.manifest.shards[i].rows:
                raise ShardCorruptError(f"{self.paths[i]}: {r.num_rows} rows, manifest says "
                                        f"{self.manifest.shards[i].rows}. {_redo(self.paths[i])}")
            self._readers[i] = r
        return self._readers[i]

    def row_blocks(self) -> list[tuple[int, int]]:
        """Global [start, stop) row ranges of every row group of every shard, in order."""
        out = []
        for i in range(len(self.paths)):
            base = self._starts[i]
            out += [(base + a, base + b) for a, b in self.shard(i).row_group_bounds()]
        return out

    def locate(self, row: int) -> tuple[int, int]:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range 0..{len(self) - 1}")
        i = bisect.bisect_right(self._starts, row) - 1
        return i, row - self._starts[i]

    def __getitem__(self, row: int) -> SequenceLabels:
        i, j = self.locate(row)
        return self.shard(i)[j]

    def __iter__(self) -> Iterator[SequenceLabels]:
        for i in range(len(self.paths)):
            yield from self.shard(i)
