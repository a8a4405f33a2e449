"""The "counts" layout of sampled labels (issue 20; storage.codec): the default for sample / hybrid runs.

Asserted against the legacy "entries" layout (what label-anneal wrote before, still selectable with
`sampled_layout=entries` and still read): the same (id, draw count) pairs per position, the same head log-probs and
hybrid tail, and the same stage-2 loss values; the drawn ids' log-probs only with `draw_logprobs`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stage1_teacher.capture_modes import distinct_draws, hybrid_entries
from stage2_student.batch import collate_labels, with_kl_target_weights
from stage2_student.losses import fused_ce_kl_sums
from storage import Encoding, ShardReader, ShardWriter, shard_path, tail_from_topk

LEGACY = Encoding()  # what a sampled run stored before issue 20
COUNTS = Encoding.parse("compact", sampled=True)
COUNTS_DIAG = Encoding.parse("compact", sampled=True, draw_logprobs=True)


def _labels(rng, n, vocab, draws, head_k, alpha):
    """One sequence's stored entries as stage 1 builds them (capture_modes.distinct_draws / hybrid_entries)."""
    logits = rng.normal(size=(n, vocab)) * alpha
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    p = np.exp(logp)
    head = np.argsort(-logp, axis=1)[:, :head_k]
    draw_ids = np.empty((n, draws), dtype=np.int64)
    for i in range(n):
        q = p[i].copy()
        q[head[i]] = 0.0
        if q.sum() <= 0:
            draw_ids[i] = -1
        else:
            draw_ids[i] = rng.choice(vocab, size=draws, p=q / q.sum())
    draw_lp = np.where(draw_ids >= 0, np.take_along_axis(logp, np.maximum(draw_ids, 0), axis=1), -np.inf).astype(
        np.float32
    )
    if head_k == 0:
        ids, lps, counts = distinct_draws(draw_ids, draw_lp, draws)
        return ids, lps, tail_from_topk(lps), counts
    head_lp = np.take_along_axis(logp, head, axis=1).astype(np.float32)
    return hybrid_entries(head, head_lp, tail_from_topk(head_lp), draw_ids, draw_lp, draws)


def _write(path, enc, rows, k, vocab, row_group_rows=2):
    with ShardWriter(
        path, fingerprint="f", k=k, vocab_size=vocab, encoding=enc, row_group_rows=row_group_rows, sampled=True
    ) as w:
        for sid, inp, mask, (ids, lps, tail, counts) in rows:
            w.add(sid, inp, mask, ids, lps, tail, sample_counts=counts)
        w.close()
    return list(ShardReader(path))


def _rows(seed, vocab, draws, head_k, n_rows=5, alpha=2.0):
    rng = np.random.default_rng(seed)
    rows = []
    for sid in range(n_rows):
        T = int(rng.integers(2, 30))
        mask = rng.random(T - 1) < 0.8
        rows.append((sid, rng.integers(0, vocab, T), mask, _labels(rng, int(mask.sum()), vocab, draws, head_k, alpha)))
    return rows


def _by_position(row):
    """Per position: head entries (rank order, with log-probs) and the drawn {id: count} map."""
    out = []
    for p in range(len(row.topk_ids)):
        v = row.topk_ids[p] >= 0
        ids, c, lp = row.topk_ids[p][v], row.sample_counts[p][v], row.topk_logprobs[p][v]
        head = c == 0
        out.append((ids[head].tolist(), lp[head].tolist(), dict(zip(ids[~head].tolist(), c[~head].tolist()))))
    return out


def _same_labels(old, new, head_k, draw_logprobs):
    assert [r.sample_id for r in old] == [r.sample_id for r in new]
    for a, b in zip(old, new):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        assert a.input_ids.dtype == b.input_ids.dtype == np.int32
        np.testing.assert_array_equal(a.label_mask, b.label_mask)
        for pa_, pb in zip(_by_position(a), _by_position(b)):
            assert pa_[0] == pb[0] and pa_[2] == pb[2]  # head ids, drawn (id, count) pairs
            np.testing.assert_array_equal(pa_[1], pb[1])  # head log-probs: the same q8 codes
        drawn = b.sample_counts > 0
        if draw_logprobs:  # the drawn ids' log-probs decode to the legacy layout's values
            for p in range(len(b.topk_ids)):
                m_a, m_b = a.sample_counts[p] > 0, drawn[p]
                got = dict(zip(b.topk_ids[p][m_b].tolist(), b.topk_logprobs[p][m_b].tolist()))
                assert got == dict(zip(a.topk_ids[p][m_a].tolist(), a.topk_logprobs[p][m_a].tolist()))
            np.testing.assert_array_equal(a.tail_logprob, b.tail_logprob)
        else:
            assert np.isnan(b.topk_logprobs[drawn]).all()  # not stored, and says so
            if head_k:
                np.testing.assert_array_equal(a.tail_logprob, b.tail_logprob)  # hybrid's p_T: the loss reads it
            else:
                assert np.isnan(b.tail_logprob).all()
        assert np.isneginf(b.topk_logprobs[b.topk_ids < 0]).all()


@pytest.mark.parametrize("head_k", [0, 4])
@pytest.mark.parametrize("enc", [COUNTS, COUNTS_DIAG], ids=["counts", "counts+draw_logprobs"])
def test_counts_layout_holds_what_the_entries_layout_holds(tmp_path, head_k, enc):
    rows = _rows(0, 300, 32, head_k)
    old = _write(shard_path(tmp_path / "old", 0, 1), LEGACY, rows, head_k + 32, 300)
    new = _write(shard_path(tmp_path / "new", 0, 1), enc, rows, head_k + 32, 300)
    _same_labels(old, new, head_k, enc.draw_logprobs)


@st.composite
def sampled_shards(draw):
    vocab = draw(st.sampled_from([2, 5, 300, 65536, 65537, 70000]) | st.integers(2, 2000))
    draws = draw(st.sampled_from([1, 2, 12, 32, 64]))
    head_k = draw(st.sampled_from([0, 0, 1, 4])) if vocab > 4 else 0
    draws = min(draws, vocab - head_k)  # the stored width head_k + draws is at most the vocabulary
    alpha = draw(st.sampled_from([0.1, 2.0, 30.0]))  # flat ... peaked teachers
    n_rows = draw(st.integers(1, 4))
    rgr = draw(st.integers(1, 3))
    return vocab, draws, head_k, alpha, n_rows, rgr, draw(st.integers(0, 2**32 - 1)), draw(st.booleans())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sampled_shards())
def test_property_counts_layout_is_lossless_for_the_loss(case):
    vocab, draws, head_k, alpha, n_rows, rgr, seed, diag = case
    vocab_sz = max(vocab, 2)
    rows = _rows(seed, min(vocab_sz, 400), draws, head_k, n_rows=n_rows, alpha=alpha)
    if vocab_sz > 400:  # spread the ids over a large vocabulary (uint32 ids above 65,536)
        rows = [
            (sid, inp * (vocab_sz // 400), m, (np.where(ids >= 0, ids * (vocab_sz // 400), -1), lp, t, c))
            for sid, inp, m, (ids, lp, t, c) in rows
        ]
    enc = COUNTS_DIAG if diag else COUNTS  # uint32 ids and input ids above 65,536
    with tempfile.TemporaryDirectory() as d:
        old = _write(shard_path(Path(d) / "old", 0, 1), LEGACY, rows, head_k + draws, vocab_sz, rgr)
        new = _write(shard_path(Path(d) / "new", 0, 1), enc, rows, head_k + draws, vocab_sz, rgr)
    _same_labels(old, new, head_k, diag)


def _sorted_by_id(rows):
    """Each position's entries in ascending id order (padding last): the order does not change the loss's
    mathematics, only its float summation order, so this makes the two layouts' batches comparable bit for bit."""
    for r in rows:
        key = np.where(r.topk_ids >= 0, r.topk_ids, np.iinfo(np.int32).max)
        o = np.argsort(key, axis=1, kind="stable")
        r.topk_ids = np.take_along_axis(r.topk_ids, o, 1)
        r.topk_logprobs = np.take_along_axis(r.topk_logprobs, o, 1)
        r.sample_counts = np.take_along_axis(r.sample_counts, o, 1)
    return rows


@pytest.mark.parametrize("head_k", [0, 4])
def test_stage2_loss_is_identical_on_both_layouts(tmp_path, head_k):
    vocab, draws = 200, 32
    rows = _rows(1, vocab, draws, head_k, n_rows=4)
    capture = {"mode": "hybrid" if head_k else "sample", "draws": draws, "seed": 0, "head_k": head_k}
    old = _sorted_by_id(_write(shard_path(tmp_path / "old", 0, 1), LEGACY, rows, head_k + draws, vocab))
    new = _sorted_by_id(_write(shard_path(tmp_path / "new", 0, 1), COUNTS, rows, head_k + draws, vocab))
    a = with_kl_target_weights(collate_labels(old), capture)
    b = with_kl_target_weights(collate_labels(new), capture)
    for key in ("input_ids", "labels", "label_mask", "topk_ids", "topk_logprobs", "tail_logprob"):
        assert torch.equal(a[key], b[key]), key
    z = torch.randn(a["topk_ids"].shape[0], vocab, generator=torch.Generator().manual_seed(0))
    labels = a["labels"][a["label_mask"]]
    la = fused_ce_kl_sums(z, labels, a["topk_ids"], a["topk_logprobs"], a["tail_logprob"])
    lb = fused_ce_kl_sums(z, labels, b["topk_ids"], b["topk_logprobs"], b["tail_logprob"])
    for x, y in zip(la, lb):
        assert torch.equal(x, y)
    # In the decoded order of each layout (no sorting) the values agree to float summation order.
    u = with_kl_target_weights(
        collate_labels(_write(shard_path(tmp_path / "u", 0, 1), COUNTS, rows, head_k + draws, vocab)), capture
    )
    lu = fused_ce_kl_sums(z, labels, u["topk_ids"], u["topk_logprobs"], u["tail_logprob"])
    for x, y in zip(la, lu):
        assert float(x) == pytest.approx(float(y), rel=1e-6)
    # The logged KL estimate needs the drawn log-probs: only the legacy layout (or draw_logprobs) has them.
    assert "kl_offset" in a and "kl_offset" not in b


def test_a_legacy_spec_keeps_its_encoding_and_fingerprint():
    """Run specs and shard metadata written before issue 20 have no sampled_layout / input_ids keys: they read as
    the entries layout with int32 input ids, and a legacy encoding writes the same dict again (same fingerprint)."""
    old = {
        "ids": "plain",
        "logprobs": "q8gap",
        "tail": "f16",
        "q8_step": 1 / 12,
        "zstd_level": 6,
        "ids_byte_stream_split": True,
    }
    enc = Encoding.from_dict(old)
    assert not enc.counts_layout() and enc.input_ids == "int32" and not enc.draw_logprobs
    assert enc.to_dict() == old
    assert Encoding.parse("compact").to_dict() == old  # top-k runs: unchanged
    assert COUNTS.to_dict() == {**old, "sampled_layout": "counts", "input_ids": "narrow"}
    assert Encoding.parse("exact", sampled=True) == Encoding.exact()
    assert Encoding.parse("zstd_level=9", sampled=True).counts_layout()
    assert not Encoding.parse("sampled_layout=entries", sampled=True).counts_layout()


def test_legacy_shard_reads(tmp_path):
    """A sampled shard written by the pre-issue-20 writer (its metadata has no new keys) reads as it did."""
    rows = _rows(3, 100, 12, 0, n_rows=2)
    got = _write(shard_path(tmp_path, 0, 1), LEGACY, rows, 12, 100)
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(shard_path(tmp_path, 0, 1)).metadata.metadata
    assert b"sampled_layout" not in meta[b"label_anneal.encoding"]
    for r, (_, inp, _, (ids, lps, tail, counts)) in zip(got, rows):
        np.testing.assert_array_equal(r.input_ids, inp)
        np.testing.assert_array_equal(r.topk_ids, ids)
        np.testing.assert_array_equal(r.sample_counts, counts)
        v = ids >= 0
        assert np.abs(r.topk_logprobs[v] - lps[v]).max() <= LEGACY.logprob_error_bound() + 1e-6
        np.testing.assert_allclose(r.tail_logprob, tail, rtol=1e-3, atol=1e-3)  # f16


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="only sampled capture modes"):
        Encoding.parse("compact", draw_logprobs=True)
    with pytest.raises(ValueError, match="exact encoding stores every log-prob"):
        Encoding.parse("exact", sampled=True, draw_logprobs=True)
    with pytest.raises(ValueError, match="draw_logprobs=true needs sampled_layout=counts"):
        Encoding.parse("sampled_layout=entries,draw_logprobs=true", sampled=True)
    with pytest.raises(ValueError, match="input_ids='u8'"):
        Encoding.parse("input_ids=u8")


def test_narrow_input_ids_out_of_range_are_refused(tmp_path):
    w = ShardWriter(shard_path(tmp_path, 0, 1), fingerprint="f", k=2, vocab_size=100, encoding=COUNTS, sampled=True)
    with pytest.raises(
        ValueError, match=r"part-00000-of-00001.parquet, sample_id 0: input ids must lie in \[0, 65535\]"
    ):
        w.add(
            0,
            np.array([1, 70000]),
            np.array([True]),
            np.array([[3, -1]]),
            np.array([[0.0, -np.inf]]),
            sample_counts=np.array([[2, 0]]),
        )
    w.abort()
