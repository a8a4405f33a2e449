"""Read a whole finalised run: all rows in shard order, each shard checked against the manifest."""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Iterator

from .errors import ShardCorruptError
from .manifest import Manifest, load_manifest
from .receipt import verify_shard
from .shard_reader import SequenceLabels, ShardReader, redo_hint


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
                raise ShardCorruptError(
                    f"{self.paths[i]}: {r.num_rows} rows, manifest says "
                    f"{self.manifest.shards[i].rows}. {redo_hint(self.paths[i])}"
                )
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


__all__ = ["RunReader"]
