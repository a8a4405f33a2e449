"""torch.utils.data adapters over a run. The only module of storage/ that imports torch."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .reader import RunReader, SequenceLabels

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


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

    def __init__(self, run_dir: Path, *, rank: int | None = None, world_size: int | None = None,
                 seed: int | None = None, verify: str = "size"):
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
            warnings.warn(f"{self.run_dir}: {n} shards for {total} readers (ranks × workers): some read "
                          f"nothing. Capture with --num-shards >= {total} to use them all.", stacklevel=2)
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


def pad_inputs(seqs, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded model inputs and CE labels for objects with `input_ids` (T,) and `label_mask` (T-1,)."""
    B = len(seqs)
    T = max(len(s.input_ids) for s in seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    label_mask = torch.zeros((B, T - 1), dtype=torch.bool)
    for b, s in enumerate(seqs):
        n = len(s.input_ids)
        input_ids[b, :n] = torch.from_numpy(np.asarray(s.input_ids, dtype=np.int64))
        attention_mask[b, :n] = 1
        label_mask[b, :n - 1] = torch.from_numpy(np.asarray(s.label_mask, dtype=bool))
    labels = torch.where(label_mask, input_ids[:, 1:], torch.full_like(input_ids[:, 1:], IGNORE_INDEX))
    return {
        "input_ids": input_ids,                      # (B, T)
        "attention_mask": attention_mask,            # (B, T)
        "label_mask": label_mask,                    # (B, T-1)
        "labels": labels,                            # (B, T-1), IGNORE_INDEX where untrained
    }


def collate_labels(batch: list[SequenceLabels], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a list of sequences into model inputs plus the teacher labels of every trained position.

    The teacher arrays are flattened over trained positions in row-major (b, t) order, the same
    order as `logits[:, :-1][label_mask]`, so the loss never gathers through padding.
    """
    out = {
        "sample_id": torch.tensor([s.sample_id for s in batch], dtype=torch.long),
        **pad_inputs(batch, pad_id),
        "topk_ids": torch.from_numpy(np.concatenate([s.topk_ids for s in batch]).astype(np.int64)),  # (N, k)
        "topk_logprobs": torch.from_numpy(np.concatenate([s.topk_logprobs for s in batch])),      # (N, k)
        "tail_logprob": torch.from_numpy(np.concatenate([s.tail_logprob for s in batch])),        # (N,)
    }
    if batch[0].sample_counts is not None:
        out["sample_counts"] = torch.from_numpy(np.concatenate([s.sample_counts for s in batch]).astype(np.int64))  # (N, k)
    return out
