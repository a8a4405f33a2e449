"""Which stored rows each process trains on, step by step ("lanes"); and torch.utils.data adapters over a run.

The order of one epoch is a pure function of (seed, epoch, G, shuffle, block_rows) and the rows per shard listed
in the manifest, where G = batch_size · grad_accum · world_size is the global batch. It does not depend on the
number of processes, the micro-batch or the accumulation separately, and no shard is opened to compute it:

1. Blocks: each shard is cut into blocks of `block_rows` consecutive rows (the last one of a shard shorter).
   The default, 256, is the shard writer's row-group size, so a block is one row group.
2. With shuffle, the blocks are permuted (numpy `default_rng([seed, epoch, ORDER_DOMAIN])`) and the rows inside
   each block are permuted (`default_rng([seed, epoch, ORDER_DOMAIN, 1 + block])`). Concatenated, they form
   the epoch's row stream. Without shuffle the stream is the rows in shard order.
3. The stream is cut into G contiguous lanes whose lengths differ by at most one (the first n mod G lanes are
   one row longer).
4. Global batch s (step s of the epoch) is row s of every lane that still has one; there are ceil(n / G) steps,
   so every stored row is trained exactly once per epoch, the short leftover included. Micro-batch slot
   k = micro · world_size + rank takes lanes [k · B, (k + 1) · B) (B = batch_size). So one process with
   batch N·B reads exactly the rows of N processes with batch B, in the same micro-batches (slot by slot
   the union is the same), and a run resumed with another process count at the same G sees the same batches.

Why lanes: each lane reads its part of the stream front to back, one block (row group) at a time, so a process
decodes only the rows it trains on (plus the ends of blocks cut between two lanes: at most G blocks per epoch),
whatever the number of processes; and holds only its lanes' current blocks. Each global batch holds rows from G
evenly spaced points of the shuffled stream, so rows of one block never share a batch (when lanes are longer than
a block) and each block's rows are spread over consecutive steps.

`ORDER_DOMAIN` keeps this stream apart from the teacher's draws (`default_rng([seed, sample_id])` in stage 1).

`stage2_student.loader.RankBatches` reads these rows for the trainer; `LabelsDataset` and `ShardStream` are the
rows of a run for a `torch.utils.data.DataLoader` of your own.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from storage import SequenceLabels
from storage.fs import location
from storage.run_reader import RunReader
from storage.writer import ROW_GROUP_ROWS

# The student's data-order streams are default_rng([seed, epoch, ORDER_DOMAIN, ...]); the teacher's draws are
# default_rng([seed, sample_id]). A fixed third word ("ORDR") keeps the two from ever being the same generator.
ORDER_DOMAIN = 0x4F524452
BLOCK_ROWS = ROW_GROUP_ROWS


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    """Optimizer steps of one epoch: every row once, the last step short when G does not divide the rows."""
    return math.ceil(num_rows / global_batch)


def slot_lanes(micro: int, *, batch_size: int, rank: int, world_size: int) -> range:
    """The lanes of micro-batch `micro` of process `rank`: slot k = micro · world_size + rank."""
    k = micro * world_size + rank
    return range(k * batch_size, (k + 1) * batch_size)


class EpochOrder:
    """The rows of one epoch as G lanes (see the module docstring). `row(lane, s)` is the global row index that
    lane `lane` contributes to step s of the epoch, or -1 once the lane is exhausted."""

    def __init__(
        self,
        shard_rows: Sequence[int],
        *,
        seed: int,
        epoch: int,
        global_batch: int,
        shuffle: bool = True,
        block_rows: int = BLOCK_ROWS,
    ):
        if global_batch < 1 or block_rows < 1:
            raise ValueError(f"global_batch={global_batch}, block_rows={block_rows}: both must be >= 1")
        self.seed, self.epoch, self.G, self.shuffle = seed, epoch, global_batch, shuffle
        rows = np.asarray(shard_rows, dtype=np.int64)
        shard_start = np.concatenate([[0], np.cumsum(rows)])
        self.n = int(shard_start[-1])
        starts, lens = [], []
        for i, r in enumerate(rows):
            a = np.arange(0, r, block_rows, dtype=np.int64)
            starts.append(shard_start[i] + a)
            lens.append(np.minimum(block_rows, r - a))
        starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        lens = np.concatenate(lens) if lens else np.zeros(0, np.int64)
        self.block_id = (
            np.random.default_rng([seed, epoch, ORDER_DOMAIN]).permutation(len(starts))
            if shuffle
            else np.arange(len(starts))
        )
        self.block_start = starts[self.block_id]  # global row of each stream block's first row
        self.block_len = lens[self.block_id]
        self.stream_start = np.concatenate([[0], np.cumsum(self.block_len)])  # stream position of each block
        q, r = divmod(self.n, self.G)
        self.lane_len = np.full(self.G, q, dtype=np.int64)
        self.lane_len[:r] += 1
        self.lane_start = np.concatenate([[0], np.cumsum(self.lane_len)])
        self.steps = steps_per_epoch(self.n, self.G)
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def block_perm(self, b: int) -> np.ndarray:
        """Order of the rows inside stream block b (offsets into the block)."""
        if not self.shuffle:
            return np.arange(self.block_len[b])
        if b not in self._perms:
            rng = np.random.default_rng([self.seed, self.epoch, ORDER_DOMAIN, 1 + int(self.block_id[b])])
            self._perms[b] = rng.permutation(int(self.block_len[b]))
            if len(self._perms) > 4096:  # a bounded cache: the loader walks blocks in order
                self._perms.popitem(last=False)
        return self._perms[b]

    def block_of(self, pos: int) -> int:
        """The stream block holding stream position `pos`."""
        return int(np.searchsorted(self.stream_start, pos, side="right") - 1)

    def row(self, lane: int, s: int) -> int:
        if not 0 <= s < self.lane_len[lane]:
            return -1
        p = int(self.lane_start[lane]) + s
        b = self.block_of(p)
        return int(self.block_start[b] + self.block_perm(b)[p - self.stream_start[b]])

    def rows(self, lanes, s: int) -> np.ndarray:
        """Global rows of `lanes` at step s, exhausted lanes left out."""
        out = [self.row(lane, s) for lane in lanes]
        return np.asarray([r for r in out if r >= 0], dtype=np.int64)

    def global_batch(self, s: int) -> np.ndarray:
        return self.rows(range(self.G), s)


def micro_batch_rows(
    order: EpochOrder, step_in_epoch: int, micro: int, *, batch_size: int, rank: int, world_size: int
) -> np.ndarray:
    """Global rows of one micro-batch of one process (may be shorter than batch_size, or empty, at the last step)."""
    return order.rows(slot_lanes(micro, batch_size=batch_size, rank=rank, world_size=world_size), step_in_epoch)


# ------------------------------------------------------------------------------------------- torch.utils.data


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class LabelsDataset(Dataset):
    """Map-style: item i is the i-th row of the run (random access; pair it with a sampler). Memory and open files
    are bounded by the `RunReader` (at most `max_open_files` shards open, one decoded row group each); random
    access decodes a whole row group per row, so prefer a sampler that reads row groups in order, or `ShardStream`."""

    def __init__(self, run_dir: Path | RunReader, *, verify: str = "checksum", max_open_files: int = 32):
        self.reader = (
            run_dir
            if isinstance(run_dir, RunReader)
            else RunReader(run_dir, verify=verify, max_open_files=max_open_files)
        )

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> SequenceLabels:
        return self.reader[i]


class ShardStream(IterableDataset):
    """Streams whole shards; shard i goes to global worker i % (world_size · num_workers), so every
    row is read by exactly one (rank, dataloader worker). With `seed` (deterministic per epoch) each shard's
    row groups are read in a shuffled order and the rows of each row group shuffled. Needs at least as many shards
    as global workers to keep every worker busy; fewer is allowed but warned about. Per worker: one open shard and
    one decoded row group."""

    def __init__(
        self,
        run_dir: Path,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int | None = None,
        verify: str = "size",
    ):
        self.run_dir, self.verify, self.seed, self.epoch = location(run_dir), verify, seed, 0
        r, w = _dist_rank_world()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} not in 0..{self.world_size - 1}")
        self._reader: RunReader | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_shards(self) -> list[int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        total, me = self.world_size * nw, self.rank * nw + wid
        n = len(self.reader().paths)
        if n < total:
            warnings.warn(
                f"{self.run_dir}: {n} shards for {total} readers (ranks × workers): some read "
                f"nothing. Capture with --num-shards >= {total} to use them all.",
                stacklevel=2,
            )
        return [i for i in range(n) if i % total == me]

    def reader(self) -> RunReader:
        if self._reader is None:  # opened lazily so each dataloader worker has its own file handles
            self._reader = RunReader(self.run_dir, verify=self.verify, max_open_files=1, cache_row_groups=0)
        return self._reader

    def __iter__(self):
        reader = self.reader()
        for i in self._my_shards():
            groups = range(len(reader.shard(i).row_group_bounds()))
            if self.seed is None:
                for g in groups:
                    yield from reader.read_row_group(i, g)
                continue
            rng = np.random.default_rng([self.seed, self.epoch, ORDER_DOMAIN, i])
            for g in rng.permutation(len(groups)):
                rows = reader.read_row_group(i, int(g))
                for j in rng.permutation(len(rows)):
                    yield rows[int(j)]


__all__ = [
    "ORDER_DOMAIN",
    "BLOCK_ROWS",
    "EpochOrder",
    "LabelsDataset",
    "ShardStream",
    "micro_batch_rows",
    "slot_lanes",
    "steps_per_epoch",
]
