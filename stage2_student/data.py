"""Which stored rows each process trains on, step by step.

The order is a function of (seed, epoch) and the run's row groups only, so every rank computes the
same global order without talking to the others, and a resumed run recomputes it exactly. Global
batch s is rows order[s·G : (s+1)·G] with G = batch_size · grad_accum · world_size; micro-batch j
of rank r takes the slice starting at (j · world_size + r) · batch_size. One process with batch 2B
therefore sees exactly the rows that two processes with batch B see together.
"""
from __future__ import annotations

import numpy as np

from storage.reader import RunReader


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
        rows = np.concatenate([np.arange(a, b) for a, b in blocks[w:w + window]])
        out.append(rows[rng.permutation(len(rows))])
    return np.concatenate(out) if out else np.arange(0)


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    return num_rows // global_batch


def micro_batch_rows(order: np.ndarray, step_in_epoch: int, micro: int, *, batch_size: int, grad_accum: int,
                     rank: int, world_size: int) -> np.ndarray:
    G = batch_size * grad_accum * world_size
    base = step_in_epoch * G + (micro * world_size + rank) * batch_size
    return order[base:base + batch_size]
