"""Baselines: anchor penalties (L2-SP, EWC) and replay mixing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lm.corpus import Sequence
from stage2_student.batch import pad_inputs
from stage2_student.config import StudentConfig
from stage2_student.regularizers import AnchorPenalty, ReplayStream, sample_teacher_targets


def test_anchor_gradient_matches_autograd_of_the_penalty():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    weights = [torch.rand(5, 3), torch.rand(4)]
    pen = AnchorPenalty(params, coeff=0.7, weights=weights)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    ref = 0.5 * 0.7 * sum((w * (p - a) ** 2).sum() for p, a, w in zip(params, pen.anchor, weights))
    grads = torch.autograd.grad(ref, params)
    pen.add_grad()
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g)
    assert pen.value() == pytest.approx(float(ref), rel=1e-5)


def test_anchor_adds_to_existing_gradient_and_uniform_is_l2():
    p = torch.nn.Parameter(torch.zeros(3))
    pen = AnchorPenalty([p], coeff=2.0)
    with torch.no_grad():
        p.copy_(torch.tensor([1.0, -2.0, 0.5]))
    p.grad = torch.ones(3)
    pen.add_grad()
    torch.testing.assert_close(p.grad, torch.tensor([3.0, -3.0, 2.0]))


def _seqs(n, T=6):
    return [
        Sequence(sample_id=i, input_ids=np.arange(T, dtype=np.int32) + i, label_mask=np.ones(T - 1, bool))
        for i in range(n)
    ]


@pytest.mark.parametrize("ratio, batch, expect", [(0.25, 6, 2), (0.5, 4, 4), (0.1, 2, 1), (0.0, 4, 0)])
def test_replay_share_per_micro_batch(ratio, batch, expect):
    kw = dict(replay_data="x.jsonl") if ratio else {}
    cfg = StudentConfig(run_dir="r", out="o", batch_size=batch, replay_ratio=ratio, **kw)
    assert cfg.replay_per_micro_batch() == expect


def test_replay_rows_are_disjoint_across_ranks_and_deterministic():
    stream = ReplayStream(_seqs(10), seed=3)
    a = [s.sample_id for s in stream.rows(step=0, micro=0, rank=0, world=2, grad_accum=1, n=3)]
    b = [s.sample_id for s in stream.rows(step=0, micro=0, rank=1, world=2, grad_accum=1, n=3)]
    assert len(set(a) | set(b)) == 6
    assert a == [s.sample_id for s in ReplayStream(_seqs(10), seed=3).rows(0, 0, 0, 2, 1, 3)]
    # Wraps around the corpus into the next epoch's permutation without short batches.
    c = stream.rows(step=3, micro=0, rank=1, world=2, grad_accum=1, n=3)
    assert len(c) == 3
    batch = pad_inputs(c, pad_id=0)
    assert batch["input_ids"].shape == (3, 6) and int(batch["label_mask"].sum()) == 15


def test_replay_needs_data_and_a_ratio():
    with pytest.raises(ValueError, match="needs --replay-data"):
        StudentConfig(run_dir="r", out="o", replay_ratio=0.3)
    with pytest.raises(ValueError, match="replay-ratio is 0"):
        StudentConfig(run_dir="r", out="o", replay_data="x.jsonl")


def test_teacher_targets_follow_the_stored_distribution():
    batch = {
        "topk_ids": torch.tensor([[5, 7]] * 4000),
        "topk_logprobs": torch.log(torch.tensor([[0.6, 0.2]] * 4000)),
        "labels": torch.zeros(1, 4000, dtype=torch.long),
        "label_mask": torch.ones(1, 4000, dtype=torch.bool),
    }
    y = sample_teacher_targets(batch, torch.Generator().manual_seed(0))[0]
    share = float((y == 5).float().mean())
    assert abs(share - 0.75) < 0.03  # renormalised over the top k: 0.6 / 0.8
