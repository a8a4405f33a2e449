"""Write one shard atomically: row groups stream into a unique, locked tmp file (`storage.atomic`), which
is then linked to its final name if no other writer got there first, and its receipt is written. A shard
under its final name is complete.

Two writers of one shard (two pods of one Kubernetes index, a requeued SLURM task beside its straggler):
the first to link wins; the other discards its file and returns the winner's receipt. Only the winner
writes the receipt, after its link, so the receipt always describes the file under the final name. A
process killed between the link and the receipt leaves a complete shard without one: `receipt_for`
rebuilds it from the file (rows and stats from its metadata, sha256 from its bytes).

A shard of a run directory on an object store (storage.fs) is built the same way in a local staging file, then
uploaded whole under its final name if no other writer's is there (a conditional PUT on S3): the same first-writer-
wins rule without a rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import failpoints
from .atomic import TmpFile, atomic_write_json, link_exclusive, remove_stale_tmp
from .codec import (
    Encoding,
    count_type,
    encode_draws,
    encode_positions,
    id_type,
    input_id_type,
    logprob_type,
    tail_from_topk,
    tail_type,
)
from .errors import RunWriteError
from .fs import AnyPath, RemotePath, file_size, location, put_file_if_absent
from .layout import FORMAT_VERSION, META_PREFIX, parse_shard_name, receipt_path
from .receipt import ShardReceipt, sha256_file

ROW_GROUP_ROWS = 256

_ROW_GROUP_WRITTEN = failpoints.declare(
    "shard.row_group_written", "row group N (1-based) of the shard is in its .tmp file; fields shard, row_group"
)
_CLOSED = failpoints.declare(
    "shard.closed", "the shard's .tmp file is complete and closed; not yet linked; field shard"
)
_LINKED = failpoints.declare(
    "shard.linked", "the shard is under its final name; its receipt not yet written; field shard"
)
_COMMITTED = failpoints.declare("shard.committed", "the shard is under its final name; field shard")


def shard_schema(
    vocab_size: int,
    enc: Encoding,
    metadata: dict[str, str],
    *,
    variable: bool = False,
    sampled: bool = False,
    k: int = 65535,
) -> pa.Schema:
    optional = []
    # The "counts" layout of sampled labels narrows the per-position and per-entry counts to the width k.
    small = count_type(k) if sampled and enc.counts_layout() else pa.uint16()
    if variable:  # entries per trained position (top-p, sampled labels)
        optional.append(pa.field("label_counts", pa.list_(small), nullable=False))
    if sampled:  # draws per stored entry (0: an exact head entry)
        optional.append(pa.field("sample_counts", pa.list_(small), nullable=False))
    return pa.schema(
        [
            pa.field("sample_id", pa.int64(), nullable=False),
            pa.field("input_ids", pa.list_(input_id_type(enc, vocab_size)), nullable=False),
            pa.field("label_mask", pa.list_(pa.bool_()), nullable=False),
            pa.field("topk_ids", pa.list_(id_type(vocab_size)), nullable=False),
            pa.field("topk_logprobs", pa.list_(logprob_type(enc)), nullable=False),
            pa.field("tail_logprob", pa.list_(tail_type(enc)), nullable=False),
            *optional,
        ],
        metadata={(META_PREFIX + k).encode(): v.encode() for k, v in metadata.items()},
    )


def _staging_path(path: AnyPath) -> Path:
    """Where a remote shard is written before its upload: $LABEL_ANNEAL_STAGING or the system tmp dir."""
    root = Path(os.environ.get("LABEL_ANNEAL_STAGING") or Path(tempfile.gettempdir()) / "label-anneal-staging")
    root.mkdir(parents=True, exist_ok=True)
    return root / path.name


def _list_array(values: np.ndarray, lengths: list[int], typ: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(np.asarray(values).astype(typ.to_pandas_dtype(), copy=False), type=typ)
    )


class ShardWriter:
    """Collects sequences and writes them as one shard.

    Use as a context manager: an exception (or a signal that raises) deletes the tmp file, so
    nothing partial is ever left under the final name.
    """

    def __init__(
        self,
        path: Path,
        *,
        fingerprint: str,
        k: int,
        vocab_size: int,
        encoding: Encoding,
        row_group_rows: int = ROW_GROUP_ROWS,
        variable: bool = False,
        sampled: bool = False,
    ):
        self.path = location(path)
        parsed = parse_shard_name(self.path.name)
        if parsed is None:
            raise ValueError(f"{self.path.name}: shard files must be named part-IIIII-of-NNNNN.parquet")
        self.index, self.num_shards = parsed
        if k <= 0 or k > vocab_size:
            raise ValueError(f"k={k} must be in 1..vocab_size ({vocab_size})")
        self.fingerprint, self.k, self.vocab_size, self.encoding = fingerprint, k, vocab_size, encoding
        self.row_group_rows = row_group_rows
        # variable: positions hold 1..k entries (padded with id -1 on input); sampled: entries carry draw counts.
        self.variable, self.sampled = variable or sampled, sampled
        if sampled and encoding.ids == "delta":
            raise ValueError("sampled labels need ids=plain: their draw counts are stored in entry order")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(self.path)
        remove_stale_tmp(receipt_path(self.path))  # a receipt write killed half-way (never read either way)
        # A remote shard is built in a local staging file and uploaded whole when complete (storage.fs).
        staged = _staging_path(self.path) if isinstance(self.path, RemotePath) else self.path
        if staged is not self.path:
            remove_stale_tmp(staged)
        self._tmp = TmpFile(staged)  # locked until the end: no other writer's sweep removes it
        self.tmp = self._tmp.path
        self._meta = {
            "format_version": str(FORMAT_VERSION),
            "fingerprint": fingerprint,
            "k": str(k),
            "vocab_size": str(vocab_size),
            "encoding": json.dumps(encoding.to_dict(), sort_keys=True),
            "shard_index": str(self.index),
            "num_shards": str(self.num_shards),
            "variable": str(int(self.variable)),
            "sampled": str(int(self.sampled)),
        }
        self.schema = shard_schema(vocab_size, encoding, self._meta, variable=self.variable, sampled=self.sampled, k=k)
        self._input_id_max = np.iinfo(self.schema.field("input_ids").type.value_type.to_pandas_dtype()).max
        self._writer: pq.ParquetWriter | None = None
        self._buf: list[tuple] = []
        self.rows = self.tokens = self.trained_tokens = 0
        self.topk_mass_sum = 0.0
        self._last_sample_id = None
        self._row_groups = 0
        self.lost_race = False  # True when another writer linked this shard first (close returns its receipt)

    def add(
        self,
        sample_id: int,
        input_ids: np.ndarray,
        label_mask: np.ndarray,
        topk_ids: np.ndarray,
        topk_logprobs: np.ndarray,
        tail_logprob: np.ndarray | None = None,
        sample_counts: np.ndarray | None = None,
    ) -> None:
        """One sequence. `label_mask` is bool (T-1,): True where predicting input_ids[t+1] is trained.
        `topk_ids`/`topk_logprobs` are (n_trained, k) sorted by descending log-prob; `tail_logprob`
        is (n_trained,), derived from the top k when not given. In a variable run a position's entries
        are a prefix padded with id -1 (log-prob -inf); in a sampled run `sample_counts` (n_trained, k)
        gives each entry's number of draws (0 for exact head entries and padding)."""
        input_ids = np.asarray(input_ids)
        label_mask = np.asarray(label_mask, dtype=bool)
        topk_ids = np.asarray(topk_ids)
        topk_logprobs = np.asarray(topk_logprobs, dtype=np.float32)
        where = f"{self.path.name}, sample_id {sample_id}"
        T = input_ids.shape[0]
        if input_ids.ndim != 1 or T < 2:
            raise ValueError(f"{where}: input_ids must be 1-D with at least 2 tokens, got shape {input_ids.shape}")
        if T and (input_ids.min() < 0 or input_ids.max() > self._input_id_max):
            raise ValueError(
                f"{where}: input ids must lie in [0, {self._input_id_max}] for this encoding's input_ids column; "
                f"got {input_ids.min()}..{input_ids.max()} (use --encoding input_ids=int32 for such a tokenizer)"
            )
        if label_mask.shape != (T - 1,):
            raise ValueError(f"{where}: label_mask must have shape ({T - 1},), got {label_mask.shape}")
        n = int(label_mask.sum())
        if topk_ids.shape != (n, self.k) or topk_logprobs.shape != (n, self.k):
            raise ValueError(
                f"{where}: top-k arrays must have shape ({n}, {self.k}) (trained positions, k); "
                f"got ids {topk_ids.shape}, logprobs {topk_logprobs.shape}"
            )
        valid = topk_ids >= 0
        if not valid.all():
            if not self.variable:
                raise ValueError(
                    f"{where}: top-k ids must lie in [0, {self.vocab_size}); got {topk_ids.min()} "
                    f"(padding with -1 is only allowed in a variable-count run)"
                )
            if (np.diff(valid.astype(np.int8), axis=1) > 0).any() or not valid[:, 0].all():
                raise ValueError(f"{where}: each position's entries must be a non-empty prefix followed by -1 padding")
            topk_logprobs = np.where(valid, topk_logprobs, -np.inf).astype(np.float32)
        if n and (topk_ids.max() >= self.vocab_size or topk_ids[valid].min() < 0):
            raise ValueError(
                f"{where}: top-k ids must lie in [0, {self.vocab_size}); got {topk_ids[valid].min()}..{topk_ids.max()}"
            )
        if self.sampled:
            if sample_counts is None or np.shape(sample_counts) != (n, self.k):
                raise ValueError(f"{where}: a sampled run needs sample_counts of shape ({n}, {self.k})")
            sample_counts = np.asarray(sample_counts)
            if (sample_counts < 0).any() or (sample_counts > 65535).any() or (sample_counts[~valid] != 0).any():
                raise ValueError(f"{where}: sample_counts must be in 0..65535 and 0 on padding")
        elif sample_counts is not None:
            raise ValueError(f"{where}: sample_counts given but this shard is not a sampled run")
        if np.isnan(topk_logprobs).any() or np.isposinf(topk_logprobs).any():
            raise ValueError(f"{where}: the engine returned NaN or +inf log-probs; refusing to store them")
        if n and (topk_logprobs > 1e-3).any():
            raise ValueError(f"{where}: log-probs must be <= 0 (normalised), got max {topk_logprobs.max():.4f}")
        with np.errstate(invalid="ignore"):  # -inf - -inf on padding is NaN, which compares False
            unsorted = n and (np.diff(topk_logprobs, axis=1) > 1e-6).any()
        if unsorted:
            raise ValueError(f"{where}: top-k log-probs must be sorted in descending order")
        sorted_ids = np.sort(np.where(valid, topk_ids, -1 - np.arange(self.k)), axis=1)  # pads all distinct
        if n and (sorted_ids[:, 1:] == sorted_ids[:, :-1]).any():
            raise ValueError(f"{where}: a position lists the same token id twice in its top k")
        tail = tail_from_topk(topk_logprobs) if tail_logprob is None else np.asarray(tail_logprob, dtype=np.float32)
        if tail.shape != (n,):
            raise ValueError(f"{where}: tail_logprob must have shape ({n},), got {tail.shape}")
        if np.isnan(tail).any() or (tail > 1e-3).any():
            raise ValueError(f"{where}: tail_logprob must be a log-probability (<= 0, not NaN)")
        if self._last_sample_id is not None and sample_id <= self._last_sample_id:
            raise ValueError(f"{where}: sample ids must increase within a shard (previous {self._last_sample_id})")
        self._last_sample_id = sample_id
        self._buf.append((int(sample_id), input_ids, label_mask, topk_ids, topk_logprobs, tail, sample_counts))
        self.rows += 1
        self.tokens += T
        self.trained_tokens += n
        self.topk_mass_sum += float(np.exp(topk_logprobs.astype(np.float64)).sum())
        if len(self._buf) >= self.row_group_rows:
            try:
                self._flush()
            except OSError as e:  # disk full, I/O error: name the shard and say what to do
                raise self._write_error(e) from e

    def _flush(self) -> None:
        if not self._buf:
            return
        sid, inp, mask, ids, lps, tails, counts = zip(*self._buf)
        self._buf = []
        if self.sampled and self.encoding.counts_layout():
            return self._write(sid, inp, mask, self._draw_columns(ids, lps, tails, counts))
        all_ids = np.concatenate(ids)
        ids_np, lp_np, tail_np = encode_positions(
            all_ids, np.concatenate(lps), np.concatenate(tails), self.encoding, self.vocab_size
        )
        n_per_row = [len(t) for t in tails]
        # Stored entries per row: k per position, or the sum of the positions' counts.
        entries = [int((x >= 0).sum()) for x in ids] if self.variable else [n * self.k for n in n_per_row]
        optional = []
        if self.variable:
            per_pos = (all_ids >= 0).sum(axis=1).astype(np.uint16)
            optional.append(_list_array(per_pos, n_per_row, pa.uint16()))
        if self.sampled:
            all_counts = np.concatenate(counts)
            optional.append(_list_array(all_counts[all_ids >= 0].astype(np.uint16), entries, pa.uint16()))
        label_cols = [
            _list_array(ids_np, entries, self.schema.field("topk_ids").type.value_type),
            _list_array(lp_np, entries, self.schema.field("topk_logprobs").type.value_type),
            _list_array(tail_np, n_per_row, self.schema.field("tail_logprob").type.value_type),
            *optional,
        ]
        self._write(sid, inp, mask, label_cols)

    def _draw_columns(self, ids, lps, tails, counts) -> list[pa.ListArray]:
        """The label columns of sampled labels in the "counts" layout (storage.codec.encode_draws)."""
        e = encode_draws(
            np.concatenate(ids),
            np.concatenate(lps),
            np.concatenate(tails),
            np.concatenate(counts),
            self.encoding,
            self.vocab_size,
        )
        bounds = np.concatenate([[0], np.cumsum([len(t) for t in tails])])

        def per_row(v: np.ndarray) -> list[int]:  # a per-position count summed over each row's positions
            c = np.concatenate([[0], np.cumsum(v, dtype=np.int64)])
            return (c[bounds[1:]] - c[bounds[:-1]]).tolist()

        n_per_row = np.diff(bounds).tolist()
        entries = per_row(e["entries"])

        def typ(name):
            return self.schema.field(name).type.value_type

        return [
            _list_array(e["ids"], entries, typ("topk_ids")),
            _list_array(e["logprobs"], per_row(e["n_logprobs"]), typ("topk_logprobs")),
            _list_array(e["tail"], per_row(e["has_tail"]), typ("tail_logprob")),
            _list_array(e["entries"].astype(typ("label_counts").to_pandas_dtype()), n_per_row, typ("label_counts")),
            _list_array(e["counts"], entries, typ("sample_counts")),
        ]

    def _write(self, sid, inp, mask, label_cols: list[pa.ListArray]) -> None:
        table = pa.Table.from_arrays(
            [
                pa.array(np.array(sid, dtype=np.int64)),
                _list_array(np.concatenate(inp), [len(x) for x in inp], self.schema.field("input_ids").type.value_type),
                _list_array(np.concatenate(mask), [len(x) for x in mask], pa.bool_()),
                *label_cols,
            ],
            schema=self.schema,
        )
        if self._writer is None:
            self._open_writer()
        self._writer.write_table(table, row_group_size=len(sid))
        self._row_groups += 1
        _ROW_GROUP_WRITTEN(shard=self.index, row_group=self._row_groups)

    def _open_writer(self) -> None:
        split_cols = [
            c for c in ("topk_logprobs", "tail_logprob") if pa.types.is_floating(self.schema.field(c).type.value_type)
        ]
        if self.encoding.ids_byte_stream_split:
            split_cols.append("topk_ids")
        self._writer = pq.ParquetWriter(
            self.tmp,
            self.schema,
            compression="zstd",
            compression_level=self.encoding.zstd_level,
            # Dictionary encoding bloats float and code columns (FINDINGS §1); ids compress better raw. The small
            # counts of the "counts" layout are the exception: dictionary indices + zstd save ~1 B/token at 32 draws.
            use_dictionary=self._dictionary_columns() or False,
            # Integer BYTE_STREAM_SPLIT needs Parquet 2.11 readers (pyarrow >= 16); see Encoding.
            use_byte_stream_split=[f"{c}.list.element" for c in split_cols] or False,
            write_statistics=["sample_id"],
        )

    def _dictionary_columns(self) -> list[str]:
        if not (self.sampled and self.encoding.counts_layout()):
            return []
        return ["sample_counts.list.element", "label_counts.list.element"]

    def close(self) -> ShardReceipt:
        """Finish the file, link it into place (first writer wins) and write its receipt. Returns the
        receipt of the shard under the final name (another writer's, when that one won)."""
        stats = {
            "rows": self.rows,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "topk_mass_sum": self.topk_mass_sum,
        }
        try:
            self._flush()
            if self._writer is None:  # an empty shard: its corpus range held no trainable sequence
                self._open_writer()
            self._writer.add_key_value_metadata({META_PREFIX + "stats": json.dumps(stats)})
            self._writer.close()
            self._writer = None
            receipt = ShardReceipt(
                name=self.path.name,
                index=self.index,
                num_shards=self.num_shards,
                rows=self.rows,
                tokens=self.tokens,
                trained_tokens=self.trained_tokens,
                topk_mass_sum=self.topk_mass_sum,
                bytes=os.path.getsize(self.tmp),
                sha256=sha256_file(self.tmp),
                fingerprint=self.fingerprint,
            )
            _CLOSED(shard=self.index)
            if isinstance(self.path, RemotePath):
                won = put_file_if_absent(self.tmp, self.path)
                self._tmp.discard()
            else:
                won = link_exclusive(self.tmp, self.path)
                self._tmp.close()
            if not won:
                self.lost_race = True
                return self._winners_receipt()
            _LINKED(shard=self.index)
            atomic_write_json(receipt_path(self.path), receipt.to_dict())
        except OSError as e:
            raise self._write_error(e) from e
        _COMMITTED(shard=self.index)
        return receipt

    def _winners_receipt(self) -> ShardReceipt:
        """The receipt of the shard another writer linked first: from its receipt file once written, else
        from the file itself (the winner may still be between its link and its receipt)."""
        rpath = receipt_path(self.path)
        size = file_size(self.path)
        if rpath.exists():
            try:
                r = ShardReceipt.from_dict(json.loads(rpath.read_text()))
                if r.bytes == size and r.fingerprint == self.fingerprint:
                    return r
            except (ValueError, KeyError, TypeError):
                pass
        source = self.path.open_input_file() if isinstance(self.path, RemotePath) else self.path
        meta = pq.ParquetFile(source).metadata.metadata or {}
        stats = json.loads(meta[(META_PREFIX + "stats").encode()])
        return ShardReceipt(
            name=self.path.name,
            index=self.index,
            num_shards=self.num_shards,
            bytes=size,
            sha256=sha256_file(self.path),
            fingerprint=self.fingerprint,
            **stats,
        )

    def _write_error(self, e: OSError) -> RunWriteError:
        return RunWriteError.from_os_error(
            self.path, e, "re-run the same `pipeline teacher` command: finished shards are kept, this one is redone"
        )

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:
                pass
            self._writer = None
        self._tmp.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False
