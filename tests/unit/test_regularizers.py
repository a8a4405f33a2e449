"""Baselines: anchor penalties (L2-SP, EWC), the per-token EWC Fisher against its analytic value, and replay
mixing by trained positions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lm.corpus import Sequence
from stage2_student.batch import pad_inputs
from stage2_student.config import StudentConfig
from stage2_student.regularizers import (
    AnchorPenalty,
    ReplayMixer,
    ReplayStream,
    estimate_fisher,
    fisher_label_weights,
    replay_rows,
    trained_positions,
)


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


def _seqs(n, T=6, rng=None):
    """n sequences; with `rng`, of random lengths 2..T and random label masks (at least one trained position)."""
    out = []
    for i in range(n):
        t = T if rng is None else int(rng.integers(2, T + 1))
        mask = np.ones(t - 1, bool) if rng is None else rng.random(t - 1) < 0.8
        mask[0] = True
        out.append(Sequence(sample_id=i, input_ids=np.arange(t, dtype=np.int32) + i, label_mask=mask))
    return out


# ------------------------------------------------------------------------------------------- replay


def test_replay_ratio_help_says_what_it_counts():
    help_ = StudentConfig.__dataclass_fields__["replay_ratio"].metadata["help"]
    assert "trained POSITIONS" in help_ and "labelled + replay" in help_


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.25])
@pytest.mark.parametrize("batch", [4, 8])
def test_replay_share_of_trained_positions_is_the_ratio(ratio, batch):
    """Over a run, replay positions / all trained positions = r within ±0.02, with labelled sequences and replay
    sequences of uneven lengths and masks (what is counted is trained positions, not sequences)."""
    rng = np.random.default_rng(0)
    labelled_rows = _seqs(500, T=128, rng=rng)
    mixer = ReplayMixer(ReplayStream(_seqs(37, T=200, rng=rng), seed=1), ratio)
    lab = rep = 0
    for step in range(60):
        rows = [labelled_rows[int(i)] for i in rng.integers(0, 500, batch)]
        n_lab = sum(trained_positions(s) for s in rows)
        seqs = mixer.take(n_lab)
        # what the training loop trains: every rank's micro-batches, padded (pad_inputs is what it runs on)
        got = [pad_inputs(r) for rank in range(2) for r in replay_rows(seqs, rank=rank, world=2, batch_size=batch)]
        lab += n_lab
        rep += sum(int(b["label_mask"].sum()) for b in got)
        if step >= 20:  # from a few steps on, the running share stays within the bound too
            assert abs(rep / (lab + rep) - ratio) <= 0.02, (step, rep / (lab + rep))
    assert abs(rep / (lab + rep) - ratio) <= 0.02
    assert mixer.share() == pytest.approx(rep / (lab + rep))


def test_replay_mixer_state_resumes_exactly():
    rng = np.random.default_rng(1)
    counts = rng.integers(100, 400, 30)
    a = ReplayMixer(ReplayStream(_seqs(9, T=50, rng=np.random.default_rng(2)), seed=0), 0.2)
    ref = [[s.sample_id for s in a.take(int(c))] for c in counts]
    b = ReplayMixer(ReplayStream(_seqs(9, T=50, rng=np.random.default_rng(2)), seed=0), 0.2)
    first = [[s.sample_id for s in b.take(int(c))] for c in counts[:12]]
    c = ReplayMixer(ReplayStream(_seqs(9, T=50, rng=np.random.default_rng(2)), seed=0), 0.2)
    c.load_state(b.state())
    assert first + [[s.sample_id for s in c.take(int(x))] for x in counts[12:]] == ref


def test_replay_rows_split_a_step_across_ranks_and_micro_batches():
    seqs = _seqs(7)
    r0 = replay_rows(seqs, rank=0, world=2, batch_size=2)
    r1 = replay_rows(seqs, rank=1, world=2, batch_size=2)
    assert [[s.sample_id for s in m] for m in r0] == [[0, 2], [4, 6]]
    assert [[s.sample_id for s in m] for m in r1] == [[1, 3], [5]]
    assert replay_rows([], rank=0, world=1, batch_size=4) == []


def test_replay_stream_is_deterministic_and_covers_each_epoch():
    s = ReplayStream(_seqs(10), seed=3)
    first = [s[i].sample_id for i in range(10)]
    assert sorted(first) == list(range(10))
    assert first == [ReplayStream(_seqs(10), seed=3)[i].sample_id for i in range(10)]
    assert sorted(s[i].sample_id for i in range(10, 20)) == list(range(10))  # the next epoch, its own order


def test_replay_needs_data_and_a_ratio():
    with pytest.raises(ValueError, match="needs --replay-data"):
        StudentConfig(run_dir="r", out="o", replay_ratio=0.3)
    with pytest.raises(ValueError, match="replay-ratio is 0"):
        StudentConfig(run_dir="r", out="o", replay_data="x.jsonl")


# ------------------------------------------------------------------------------------------- EWC Fisher


@pytest.fixture
def one_thread():
    """Thousands of tiny backward passes: intra-op threads only contend (40x slower on 2 busy cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class HeadOnly(torch.nn.Module):
    """logits = W h(x_t): an lm_head block whose input is a fixed vector per token, so the per-token Fisher of W
    under y ~ p is analytic: F_{v,j} = mean_t p_v (1 − p_v) h_j²."""

    def __init__(self, vocab_in=11, hidden=4, vocab=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("h", torch.randn(vocab_in, hidden, generator=g))
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(torch.randn(vocab, hidden, generator=g))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.lm_head(self.h[input_ids]))

    def probs(self, ids):
        with torch.no_grad():
            return torch.softmax(self.lm_head(self.h[ids]), -1)


def _fisher_batches(model, stream, seq_len, mode, draws=64, batch=4):
    """The token stream cut into sequences of seq_len, every position trained, labelled with all V ids (topk) or
    with `draws` draws from the model (sample); collated as `batch.collate_labels` would."""
    rng = np.random.default_rng(5)
    seqs = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    V = model.lm_head.weight.shape[0]
    out = []
    for i in range(0, len(seqs), batch):
        ids = torch.tensor(np.stack(seqs[i : i + batch]), dtype=torch.long)  # (B, T)
        p = model.probs(ids[:, :-1]).reshape(-1, V)  # (N, V), row-major over (b, t) like the collated labels
        b = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "label_mask": torch.ones(ids.shape[0], seq_len - 1, dtype=torch.bool),
            "topk_ids": torch.arange(V).expand(p.shape[0], V).clone(),
            "topk_logprobs": p.log(),
            "tail_logprob": torch.full((p.shape[0],), float("-inf")),
        }
        if mode == "sample":
            counts = np.stack([rng.multinomial(draws, row / row.sum()) for row in p.double().numpy()])
            b["sample_counts"] = torch.from_numpy(counts)
            b["topk_ids"] = torch.where(b["sample_counts"] > 0, b["topk_ids"], -1)
        out.append(b)
    return out


def _analytic_fisher(model, batches):
    p = torch.cat([model.probs(b["input_ids"][:, :-1]).reshape(-1, model.lm_head.weight.shape[0]) for b in batches])
    h = torch.cat([model.h[b["input_ids"][:, :-1]].reshape(-1, model.h.shape[1]) for b in batches])
    return (p * (1 - p)).T @ h.pow(2) / p.shape[0]  # (V, H)


def _corr(a, b):
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


CAPTURE = {"topk": {"mode": "topk"}, "sample": {"mode": "sample", "draws": 64, "seed": 0, "head_k": 0}}


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_ewc_fisher_is_the_analytic_per_token_fisher(mode, one_thread):
    model = HeadOnly()
    stream = np.random.default_rng(3).integers(0, 11, 1024)
    batches = _fisher_batches(model, stream, 16, mode)
    est = estimate_fisher(model, batches, CAPTURE[mode], "cpu", seed=0, sign_draws=16)[0]
    ref = _analytic_fisher(model, batches)
    assert _corr(est, ref) >= 0.99
    assert float(est.sum() / ref.sum()) == pytest.approx(1.0, abs=0.05)


def test_ewc_fisher_strength_does_not_change_with_seq_len(one_thread):
    """The same tokens cut into sequences of 4 or of 64: the same per-token Fisher (a squared per-sequence mean
    gradient would be 16x weaker at 64)."""
    model = HeadOnly()
    stream = np.random.default_rng(4).integers(0, 11, 512)
    est = {}
    for seq_len, draws in ((4, 8), (64, 128)):  # the same number of backward passes (1024) for both
        batches = _fisher_batches(model, stream, seq_len, "topk")
        est[seq_len] = estimate_fisher(model, batches, CAPTURE["topk"], "cpu", seed=1, sign_draws=draws)[0]
        ref = _analytic_fisher(model, batches)
        assert float(est[seq_len].sum() / ref.sum()) == pytest.approx(1.0, abs=0.05)
    assert float(est[4].sum() / est[64].sum()) == pytest.approx(1.0, abs=0.05)
    assert _corr(est[4], est[64]) >= 0.99


def test_fisher_label_weights_are_the_capture_modes_target():
    b = {
        "topk_ids": torch.tensor([[4, 2, -1], [1, 3, 0]]),
        "topk_logprobs": torch.log(torch.tensor([[0.5, 0.2, 0.0], [0.3, 0.3, 0.3]])),
        "tail_logprob": torch.log(torch.tensor([0.3, 0.1])),
    }
    ids, w = fisher_label_weights(b, {"mode": "topk"})  # top k renormalised (the tail's ids are not stored)
    torch.testing.assert_close(w, torch.tensor([[5 / 7, 2 / 7, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    assert int(ids.min()) >= 0
    b["sample_counts"] = torch.tensor([[3, 1, 0], [2, 0, 2]])
    _, w = fisher_label_weights(b, {"mode": "sample"})  # draw counts / N
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.25, 0.0], [0.5, 0.0, 0.5]]))
