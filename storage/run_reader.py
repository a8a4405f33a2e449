"""Read a whole finalised run: all rows in shard order, each shard checked against the manifest.

Cost follows what is read, not the size of the run:
- Opening a run reads the manifest and stats every shard (size against the manifest): no shard is opened.
- A shard is checked when this process first reads it: footer, fingerprint and row count. With
  verify="checksum" the sha256 of the whole file is checked once per run, not once per process: with
  `checksum_share=(rank, world)` process `rank` hashes only shards i with i % world == rank, when it first
  reads one or from `verify_owned()` (the trainer runs it on a background thread). So the N processes of a
  job read the run once between them for checksums, in parallel, and none waits for another.
- At most `max_open_files` shards are open at once (least recently used closed first), each with at most
  `cache_row_groups` decoded row groups: memory and file descriptors are bounded whatever the number of shards.
  Running out of descriptors anyway raises `OpenFilesLimitError`, which names the limit and `ulimit -n`.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

from .errors import ShardCorruptError
from .fs import location
from .manifest import Manifest, load_manifest
from .receipt import check_checksum, check_size
from .shard_reader import SequenceLabels, ShardReader, redo_hint

VERIFY_CHOICES = ("checksum", "size", "none")


class RunReader:
    """All rows of a finalised run, in shard order. `verify`: "checksum" (default: sizes on open, footers when
    read, and the sha256 of each shard of this process's `checksum_share` when it is first read or by
    `verify_owned`), "size" (sizes on open, footers when read), or "none" (footers when read).
    Not thread-safe: give each thread its own reader."""

    def __init__(
        self,
        run_dir: Path,
        *,
        verify: str = "checksum",
        max_open_files: int = 32,
        cache_row_groups: int = 1,
        checksum_share: tuple[int, int] = (0, 1),
    ):
        if verify not in VERIFY_CHOICES:
            raise ValueError(f"verify={verify!r}: choose checksum, size or none")
        if max_open_files < 1:
            raise ValueError(f"max_open_files={max_open_files}: must be >= 1")
        self.run_dir = location(run_dir)
        self.verify = verify
        rank, world = checksum_share
        if not 0 <= rank < world:
            raise ValueError(f"checksum_share={checksum_share}: need 0 <= rank < world")
        self._share = (rank, world)
        self._hashed: set[int] = set()  # shards whose sha256 this process has checked (shared with verify_owned)
        self.max_open_files = max_open_files
        self.cache_row_groups = cache_row_groups
        self.manifest: Manifest = load_manifest(self.run_dir)
        self.spec = self.manifest.spec
        self._fingerprint = self.spec.fingerprint  # computed once: hashing the spec per shard open adds up
        self.paths = [self.run_dir / "shards" / s.name for s in self.manifest.shards]
        if verify != "none":
            for p, r in zip(self.paths, self.manifest.shards):
                check_size(p, r)
        self._starts = [0]
        for s in self.manifest.shards:
            self._starts.append(self._starts[-1] + s.rows)
        self._open: OrderedDict[int, ShardReader] = OrderedDict()
        self._last: tuple = (-1, -1, None)  # (shard, row group, rows) last decoded by __getitem__
        self.rows_decoded = 0  # rows of the row groups decoded so far (for the loader benchmark)
        self.shards_opened = 0

    @property
    def k(self) -> int:
        return self.spec.k

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def shard_rows(self) -> list[int]:
        """Rows of each shard, from the manifest (no file is opened)."""
        return [s.rows for s in self.manifest.shards]

    def shard_start(self, i: int) -> int:
        """Global index of the first row of shard i."""
        return self._starts[i]

    def shard(self, i: int) -> ShardReader:
        """Shard i, opened (and checked, the first time) if it is not among the open ones."""
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        receipt = self.manifest.shards[i]
        if self.verify == "checksum" and self._owns(i) and i not in self._hashed:
            check_checksum(self.paths[i], receipt)  # before decoding anything from it
            self._hashed.add(i)
        while len(self._open) >= self.max_open_files:
            self._open.popitem(last=False)[1].close()
        r = ShardReader(self.paths[i], expect_fingerprint=self._fingerprint, cache_row_groups=self.cache_row_groups)
        if r.num_rows != receipt.rows:
            r.close()
            raise ShardCorruptError(
                f"{self.paths[i]}: {r.num_rows} rows, manifest says {receipt.rows}. {redo_hint(self.paths[i])}"
            )
        self.shards_opened += 1
        self._open[i] = r
        return r

    def _owns(self, i: int) -> bool:
        rank, world = self._share
        return i % world == rank

    def owned_shards(self) -> list[int]:
        """The shards whose sha256 this process checks (all of them with the default share (0, 1))."""
        return [i for i in range(len(self.paths)) if self._owns(i)]

    def verify_owned(self, stop=None) -> int:
        """Check the sha256 of every shard this process owns and has not checked yet; returns how many it
        hashed. Safe to run on its own thread next to the reading thread (it touches only paths, receipts
        and the set of hashed shards; a shard hashed twice by a race is merely hashed twice). `stop`: an
        optional threading.Event that ends it early."""
        if self.verify != "checksum":
            return 0
        n = 0
        for i in self.owned_shards():
            if stop is not None and stop.is_set():
                break
            if i not in self._hashed:
                check_checksum(self.paths[i], self.manifest.shards[i])
                self._hashed.add(i)
                n += 1
        return n

    def read_row_group(self, i: int, g: int) -> list[SequenceLabels]:
        rows = self.shard(i).read_row_group(g)
        self.rows_decoded += len(rows)
        return rows

    def rows_of_shard(self, i: int, start: int, stop: int) -> list[SequenceLabels]:
        """Rows [start, stop) of shard i, decoding only the row groups that hold them."""
        shard = self.shard(i)
        out: list[SequenceLabels] = []
        for g, (a, b) in enumerate(shard.row_group_bounds()):
            if b <= start or a >= stop:
                continue
            rows = self.read_row_group(i, g)
            out += rows[max(start, a) - a : min(stop, b) - a]
        return out

    def open_files(self) -> int:
        return len(self._open)

    def close(self) -> None:
        self._last = (-1, -1, None)
        while self._open:
            self._open.popitem(last=False)[1].close()

    def locate(self, row: int) -> tuple[int, int]:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range 0..{len(self) - 1}")
        i = bisect.bisect_right(self._starts, row) - 1
        return i, row - self._starts[i]

    def __getitem__(self, row: int) -> SequenceLabels:
        i, j = self.locate(int(row))
        # Keeps the last decoded row group (one, whatever the shards' own caches): reading rows in order decodes
        # each row group once.
        shard = self.shard(i)
        for g, (a, b) in enumerate(shard.row_group_bounds()):
            if a <= j < b:
                if self._last[:2] != (i, g):
                    self._last = (i, g, self.read_row_group(i, g))
                return self._last[2][j - a]
        raise IndexError(f"row {row}: not in shard {i}")

    def __iter__(self) -> Iterator[SequenceLabels]:
        for i in range(len(self.paths)):
            shard = self.shard(i)
            for g in range(len(shard.row_group_bounds())):
                yield from self.read_row_group(i, g)


__all__ = ["RunReader", "VERIFY_CHOICES"]
