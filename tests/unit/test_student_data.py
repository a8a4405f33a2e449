"""`stage2_student.data` dataset adapters: every row read exactly once across ranks and workers; and
`stage2_student.batch.collate_labels` alignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from stage2_student.batch import IGNORE_INDEX, collate_labels
from stage2_student.data import LabelsDataset, ShardStream
from storage.synthetic import synthetic_spec, write_synthetic_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    write_synthetic_run(d, synthetic_spec(num_shards=6, num_sequences=30, k=4, vocab_size=64))
    return d


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (2, 2), (3, 1)])
def test_stream_splits_without_duplicates(run_dir, world, workers):
    seen = []
    for rank in range(world):
        ds = ShardStream(run_dir, rank=rank, world_size=world, seed=3)
        dl = DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=lambda x: x)
        seen += [s.sample_id for s in dl]
    assert sorted(seen) == list(range(30))


def test_stream_shuffle_is_deterministic_per_epoch(run_dir):
    a = [s.sample_id for s in ShardStream(run_dir, seed=1)]
    b = [s.sample_id for s in ShardStream(run_dir, seed=1)]
    ds = ShardStream(run_dir, seed=1)
    ds.set_epoch(1)
    c = [s.sample_id for s in ds]
    assert a == b and sorted(a) == sorted(c) and a != c


def test_collate_aligns_teacher_rows_with_label_mask(run_dir):
    rows = [LabelsDataset(run_dir)[i] for i in (0, 2, 5)]  # includes a short sequence (sid % 3 == 2)
    batch = collate_labels(rows, pad_id=7)
    B, T = batch["input_ids"].shape
    assert T == max(len(r.input_ids) for r in rows)
    assert batch["topk_ids"].shape[0] == int(batch["label_mask"].sum()) == sum(int(r.label_mask.sum()) for r in rows)
    # Row-major over (b, t): the flattened teacher rows follow each sequence's own trained positions.
    expect = np.concatenate([r.topk_ids for r in rows])
    np.testing.assert_array_equal(batch["topk_ids"].numpy(), expect)
    lm = batch["label_mask"]
    assert (batch["labels"][~lm] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][lm], batch["input_ids"][:, 1:][lm])
    short = rows[1]
    assert (batch["input_ids"][1, len(short.input_ids) :] == 7).all()
    assert not lm[1, len(short.input_ids) - 1 :].any(), "no trained position crosses into padding"
