"""Which stored rows each process trains on, step by step; and torch.utils.data adapters over a run.

The order is a function of (seed, epoch) and the run's row groups only, so every rank computes the
same global order without talking to the others, and a resumed run recomputes it exactly. Global
batch s is rows order[s·G : (s+1)·G] with G = batch_size · grad_accum · world_size; micro-batch j
of rank r takes the slice starting at (j · world_size + r) · batch_size. One process with batch 2B
therefore sees exactly the rows that two processes with batch B see together.

The trainer reads through `epoch_order` / `micro_batch_rows`; `LabelsDataset` and `ShardStream` are the
same rows for a `torch.utils.data.DataLoader` of your own.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from storage import SequenceLabels
from storage.run_reader import RunReader


def epoch_order(reader: RunReader, *, seed: int, epoch: int, shuffle: bool = True, window: int = 4) -> np.ndarray:
    """Global row indices for one epoch. Shuffles whole row groups, then rows within windows of
    `window` consecutive row groups: near-uniform mixing while each step decodes only a few row groups."""
    n = len(reader)
    if not shuffle:
        return np.arange(n)
    rng = np.random.default_rng([seed, epoch])
    blocks = reader.row_blocks()
    blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    out = []
    for w in range(0, len(blocks), window):
        rows = np.concatenate([np.arange(a, b) for a, b in blocks[w : w + window]])
        out.append(rows[rng.permutation(len(rows))])
    return np.concatenate(out) if out else np.arange(0)


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    return num_rows // global_batch


def micro_batch_rows(
    order: np.ndarray, step_in_epoch: int, micro: int, *, batch_size: int, grad_accum: int, rank: int, world_size: int
) -> np.ndarray:
    G = batch_size * grad_accum * world_size
    base = step_in_epoch * G + (micro * world_size + rank) * batch_size
    return order[base : base + batch_size]


# ------------------------------------------------------------------------------------------- torch.utils.data


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class LabelsDataset(Dataset):
    """Map-style: item i is the i-th row of the run (random access; pair it with a sampler)."""

    def __init__(self, run_dir: Path | RunReader, *, verify: str = "checksum"):
        self.reader = run_dir if isinstance(run_dir, RunReader) else RunReader(run_dir, verify=verify)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> SequenceLabels:
        return self.reader[i]


class ShardStream(IterableDataset):
    """Streams whole shards; shard i goes to global worker i % (world_size · num_workers), so every
    row is read by exactly one (rank, dataloader worker). Rows are shuffled within each shard when
    `seed` is given (deterministic per epoch). Needs at least as many shards as global workers to
    keep every worker busy; fewer is allowed but warned about."""

    def __init__(
        self,
        run_dir: Path,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int | None = None,
        verify: str = "size",
    ):
        self.run_dir, self.verify, self.seed, self.epoch = Path(run_dir), verify, seed, 0
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
            self._reader = RunReader(self.run_dir, verify=self.verify)
        return self._reader

    def __iter__(self):
        reader = self.reader()
        for i in self._my_shards():
            shard = reader.shard(i)
            if self.seed is None:
                yield from shard
            else:
                order = np.random.default_rng([self.seed, self.epoch, i]).permutation(len(shard))
                for j in order:
                    yield shard[int(j)]
