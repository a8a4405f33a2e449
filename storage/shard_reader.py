"""Read one shard: random access by row, streaming by row group, with validation on open."""

from __future__ import annotations

import errno
import json
import resource
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .codec import Encoding, decode_draws, decode_positions
from .errors import ForeignShardError, FormatVersionError, OpenFilesLimitError, ShardCorruptError
from .fs import AnyPath, RemotePath, location
from .layout import META_PREFIX, READABLE_FORMAT_VERSIONS


@dataclass
class SequenceLabels:
    """One stored sequence. Position t predicts input_ids[t+1]; only positions with label_mask set
    carry teacher labels, in order."""

    sample_id: int
    input_ids: np.ndarray  # int32 (T,)
    label_mask: np.ndarray  # bool (T-1,)
    topk_ids: np.ndarray  # int32 (n, k), n = label_mask.sum(), sorted by descending log-prob
    topk_logprobs: np.ndarray  # float32 (n, k)
    tail_logprob: np.ndarray  # float32 (n,) log of the teacher mass outside the top k
    # Sampled runs only: (n, k) uint16 draws per entry (0 for exact head entries and padding).
    # In variable runs (top-p, sampled) positions are padded to k with id -1 and log-prob -inf.
    # Sampled runs in the "counts" layout (storage.codec): exact head entries first, then the drawn ids by
    # ascending id; log-probs and tail NaN where not stored (drawn ids without --store-draw-logprobs).
    sample_counts: np.ndarray | None = None


def redo_hint(path: Path) -> str:
    """What to do about a damaged or foreign shard: redo that one shard only."""
    return (
        f"Delete {path} (and its receipt) and re-run `pipeline teacher` for that shard index; "
        f"the other shards are unaffected"
    )


def is_out_of_files(e: BaseException) -> bool:
    """EMFILE / ENFILE, as an OSError from Python or as pyarrow's IOError text ("[Errno 24] Too many open files")."""
    if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
        return True
    text = str(e)
    return f"[Errno {errno.EMFILE}]" in text or f"[Errno {errno.ENFILE}]" in text or "Too many open files" in text


def out_of_files_error(path: Path, e: BaseException) -> OpenFilesLimitError:
    """The error for a shard that could not be opened because no file descriptor was left: never "corrupt"."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return OpenFilesLimitError(
        f"{path}: could not be opened: this process has no file descriptor left (open-files limit "
        f"`ulimit -n` = {soft}, hard limit {hard}; {e}). The shard itself is not the problem. Raise the limit "
        f"before starting (e.g. `ulimit -n 65536`), or lower --max-open-files / the number of processes per node"
    )


def _raise_if_unreachable(path: AnyPath, e: BaseException) -> None:
    """A remote read that failed because the store is unreachable (not because the bytes are bad) is a
    StorageError saying so, never "corrupt": asking for the object's size tells the two apart."""
    if isinstance(path, RemotePath) and isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        path.exists()  # raises storage.fs's error naming the store when it does not answer


def _flat(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False)
    return values[offsets[0] : offsets[-1]], offsets - offsets[0]


class ShardReader:
    """One shard file. Checks the Parquet footer and the key-value metadata on open. Holds one open file until
    `close()`; keeps up to `cache_row_groups` decoded row groups (0: none, the caller keeps what it needs)."""

    def __init__(self, path: AnyPath, *, expect_fingerprint: str | None = None, cache_row_groups: int = 4):
        self.path = location(path)
        self.cache_row_groups = max(0, cache_row_groups)
        self._source = None  # the remote file ParquetFile reads from (closed with it)
        try:
            self._pf = self._open()
        except FileNotFoundError:
            raise
        except (pa.ArrowInvalid, OSError) as e:
            _raise_if_unreachable(self.path, e)
            if is_out_of_files(e):
                raise out_of_files_error(self.path, e) from e
            raise ShardCorruptError(
                f"{self.path}: not a readable Parquet file ({e}); it is truncated or corrupt. {redo_hint(self.path)}"
            ) from e
        raw = self._pf.metadata.metadata or {}  # file-level: includes what was added at close
        meta = {
            k.decode()[len(META_PREFIX) :]: v.decode() for k, v in raw.items() if k.decode().startswith(META_PREFIX)
        }
        if "fingerprint" not in meta:
            raise ForeignShardError(f"{self.path}: not a label-anneal shard (no fingerprint in its metadata)")
        if int(meta.get("format_version", -1)) not in READABLE_FORMAT_VERSIONS:
            raise FormatVersionError(
                f"{self.path}: shard format version {meta.get('format_version')}, "
                f"this label-anneal reads {', '.join(map(str, READABLE_FORMAT_VERSIONS))}"
            )
        self.fingerprint = meta["fingerprint"]
        if expect_fingerprint is not None and self.fingerprint != expect_fingerprint:
            raise ForeignShardError(
                f"{self.path}: belongs to another run (fingerprint {self.fingerprint}, this run "
                f"{expect_fingerprint}). Move it out of the run directory, or {redo_hint(self.path).lower()}"
            )
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

    def _open(self) -> pq.ParquetFile:
        if not isinstance(self.path, RemotePath):
            return pq.ParquetFile(self.path)
        # One random-access file per shard: the footer in one range request, then each row group's column
        # chunks coalesced into a few requests (pre_buffer) -- whole row groups per request, never per row.
        try:
            source = self.path.open_input_file()
        except FileNotFoundError:
            raise
        except OSError as e:
            _raise_if_unreachable(self.path, e)
            raise
        self._source = source
        return pq.ParquetFile(source, pre_buffer=True)

    def __len__(self) -> int:
        return self.num_rows

    def _decode(self, table: pa.Table) -> list[SequenceLabels]:
        sid = table.column("sample_id").to_numpy()
        inp, inp_off = _flat(table.column("input_ids"))
        inp = inp.astype(np.int32, copy=False)  # narrow (uint16) input ids widen once per row group
        mask, mask_off = _flat(table.column("label_mask"))
        ids, _ = _flat(table.column("topk_ids"))
        lps, _ = _flat(table.column("topk_logprobs"))
        tail, tail_off = _flat(table.column("tail_logprob"))
        counts = _flat(table.column("label_counts"))[0].astype(np.int64) if self.variable else None
        draws = None
        if self.sampled and self.encoding.counts_layout():
            tail_off = _flat(table.column("label_counts"))[1]  # positions per row
            flat_draws, _ = _flat(table.column("sample_counts"))
            ids, lps, tail, draws = decode_draws(ids, flat_draws, lps, tail, counts, self.k, self.encoding)
        else:
            ids, lps, tail = decode_positions(ids, lps, tail, self.k, self.encoding, counts)
        if self.sampled and draws is None:
            flat_draws, _ = _flat(table.column("sample_counts"))
            draws = np.zeros(ids.shape, dtype=np.uint16)
            draws[np.arange(self.k)[None, :] < counts[:, None]] = flat_draws
        out = []
        for r in range(len(sid)):
            a, b = tail_off[r], tail_off[r + 1]
            out.append(
                SequenceLabels(
                    sample_id=int(sid[r]),
                    input_ids=inp[inp_off[r] : inp_off[r + 1]].astype(np.int32, copy=False),
                    label_mask=mask[mask_off[r] : mask_off[r + 1]].astype(bool, copy=False),
                    topk_ids=ids[a:b],
                    topk_logprobs=lps[a:b],
                    tail_logprob=tail[a:b],
                    sample_counts=None if draws is None else draws[a:b],
                )
            )
        return out

    def read_row_group(self, i: int) -> list[SequenceLabels]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        try:
            rows = self._decode(self._pf.read_row_group(i, use_threads=False))
        except (pa.ArrowInvalid, OSError, ValueError) as e:
            _raise_if_unreachable(self.path, e)
            if is_out_of_files(e):
                raise out_of_files_error(self.path, e) from e
            raise ShardCorruptError(
                f"{self.path}: row group {i} cannot be decoded ({e}). {redo_hint(self.path)}"
            ) from e
        if self.cache_row_groups:
            self._cache[i] = rows
            if len(self._cache) > self.cache_row_groups:
                self._cache.popitem(last=False)
        return rows

    def close(self) -> None:
        """Release the open file and the decoded row groups."""
        self._cache.clear()
        self._pf.close()
        if self._source is not None:
            self._source.close()

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


__all__ = ["SequenceLabels", "ShardReader", "redo_hint", "is_out_of_files", "out_of_files_error"]
