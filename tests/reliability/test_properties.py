"""Property-based tests (hypothesis): the shard format round-trips any shape, mask, k and vocabulary
(bit-exact with `Encoding.exact()`, within `Encoding.logprob_error_bound()` above `q8_floor()` with the
default encoding), and the fused CE + KL loss equals the plain autograd functions, stays finite and
keeps KL >= 0, also at the extremes: log-probs of -1e4, a top-k mass of exactly 1 (tail -inf), k = V,
logits of ±1e4."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stage2_student.losses import ce_sum, fused_ce_kl_sums, loss_weights, topk_kl_sum
from storage import Encoding, ShardReader, ShardWriter, shard_path, tail_from_topk

# ---------------------------------------------------------------------------------------------------
# storage round trip


@st.composite
def shard_contents(draw):
    """(vocab, k, rows, derive_tail); rows: (sample_id, input_ids, mask, ids, logprobs, tail) with
    ids distinct per position and log-probs sorted descending, as an engine returns them."""
    vocab = draw(st.sampled_from([2, 3, 17, 384, 65536, 65537, 70000]) | st.integers(2, 3000))
    k = draw(st.integers(1, min(vocab, 40)))
    n_rows = draw(st.integers(1, 5))
    mask_p = draw(st.sampled_from([0.0, 0.4, 1.0]))
    alpha = draw(st.sampled_from([0.05, 1.0, 20.0]))  # peaked ... flat teacher distributions
    extreme = draw(st.sampled_from(["none", "floor", "full_mass", "both"]))
    derive_tail = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows, sid = [], int(rng.integers(0, 1000))
    for _ in range(n_rows):
        T = int(rng.integers(2, 40))
        mask = rng.random(T - 1) < mask_p
        n = int(mask.sum())
        ids = (
            np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)]) if n else np.zeros((0, k), np.int64)
        )
        p = rng.dirichlet(np.full(k + 1, alpha), size=n)  # (n, k+1): k head entries + the tail
        with np.errstate(divide="ignore"):
            lp = np.log(-np.sort(-p[:, :k], axis=1))  # descending; an underflowed 0 is -inf
            tail = np.log(p[:, k])
        if n and extreme in ("floor", "both"):  # probabilities far below anything fp32 can hold
            lp[:, k // 2 :] = np.minimum(lp[:, k // 2 :], -1e4)
            tail[::2] = -1e4
        if n and extreme in ("full_mass", "both"):  # the top k hold all the mass: the tail is -inf
            lp[::3] = np.concatenate([[0.0], np.full(k - 1, -1e4)])
            tail[::3] = -np.inf
        rows.append(
            (
                sid,
                rng.integers(0, vocab, size=T).astype(np.int32),
                mask,
                ids.astype(np.int64),
                lp.astype(np.float32),
                tail.astype(np.float32),
            )
        )
        sid += int(rng.integers(1, 5))
    return vocab, k, rows, derive_tail


def _round_trip(vocab, k, rows, derive_tail, enc, row_group_rows):
    with tempfile.TemporaryDirectory() as d:
        path = shard_path(Path(d), 0, 1)
        with ShardWriter(
            path, fingerprint="prop", k=k, vocab_size=vocab, encoding=enc, row_group_rows=row_group_rows
        ) as w:
            for sid, inp, mask, ids, lp, tail in rows:
                w.add(sid, inp, mask, ids, lp, None if derive_tail else tail)
            receipt = w.close()
        reader = ShardReader(path, expect_fingerprint="prop")
        got = list(reader)
        assert receipt.rows == len(rows) == len(reader)
        assert [reader[i].sample_id for i in range(len(rows))] == [r.sample_id for r in got]
        return got


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(contents=shard_contents(), row_group_rows=st.integers(1, 4))
def test_exact_encoding_round_trip_is_bit_exact(contents, row_group_rows):
    vocab, k, rows, derive_tail = contents
    got = _round_trip(vocab, k, rows, derive_tail, Encoding.exact(), row_group_rows)
    for (sid, inp, mask, ids, lp, tail), g in zip(rows, got):
        assert g.sample_id == sid
        np.testing.assert_array_equal(g.input_ids, inp)
        np.testing.assert_array_equal(g.label_mask, mask)
        np.testing.assert_array_equal(g.topk_ids, ids)
        np.testing.assert_array_equal(g.topk_logprobs, lp)
        if derive_tail:
            tail = tail_from_topk(lp)
        np.testing.assert_array_equal(g.tail_logprob, tail)
        assert g.topk_ids.shape == g.topk_logprobs.shape == (mask.sum(), k) and g.tail_logprob.shape == (mask.sum(),)
    # A derived tail is -inf where the top k hold all the mass. (A given tail is stored as given, even a
    # finite -1e4 beside a top-1 log-prob of 0: the bit-exact check above covers it.)
    if derive_tail:
        for (_, _, _, _, lp, _), g in zip(rows, got):
            full = (lp[:, 0] == 0.0) if len(lp) else np.zeros(0, bool)
            assert np.all(g.tail_logprob[full] == -np.inf)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(contents=shard_contents(), row_group_rows=st.integers(1, 4))
def test_default_encoding_round_trip_within_documented_bound(contents, row_group_rows):
    vocab, k, rows, derive_tail = contents
    enc = Encoding()
    bound, floor = enc.logprob_error_bound(), enc.q8_floor()
    # The decoded values are fp32: near the floor (|lp| ~ 21) one ulp is ~2e-6, so allow a few ulps
    # of the floor's magnitude on top of the half-step bound.
    slack = 8 * float(np.finfo(np.float32).eps) * abs(floor)
    got = _round_trip(vocab, k, rows, derive_tail, enc, row_group_rows)
    for (sid, inp, mask, ids, lp, tail), g in zip(rows, got):
        assert g.sample_id == sid
        np.testing.assert_array_equal(g.input_ids, inp)
        np.testing.assert_array_equal(g.label_mask, mask)
        assert g.topk_ids.shape == (len(ids), k)
        for p in range(len(ids)):
            a, b = np.argsort(ids[p]), np.argsort(g.topk_ids[p])
            np.testing.assert_array_equal(g.topk_ids[p][b], ids[p][a], err_msg="the same ids")
            err = np.abs(g.topk_logprobs[p][b] - np.maximum(lp[p][a], floor))
            assert err.max() <= bound + slack, (p, err.max(), bound)
        assert np.all(np.diff(g.topk_logprobs, axis=1) <= 0), "decoded log-probs stay descending"
        assert np.all(g.topk_logprobs >= floor) and np.all(g.topk_logprobs <= 0)
        if derive_tail:
            tail = tail_from_topk(lp)
        # The tail is stored in fp16: exactly the fp16 rounding, -inf kept as -inf.
        np.testing.assert_array_equal(g.tail_logprob, tail.astype(np.float16).astype(np.float32))


# ---------------------------------------------------------------------------------------------------
# the loss


def loss_case(n, v, k, seed, extreme, logit_scale):
    """Student logits and labels, and a teacher top-k (sorted) with its exact tail, as stage 1 stores them."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(n, v)) * 3.0
    teacher -= np.logaddexp.reduce(teacher, axis=1, keepdims=True)  # (N, V) float64 log-probs
    order = np.argsort(-teacher, axis=1)[:, :k]
    lp = np.take_along_axis(teacher, order, axis=1)  # (N, k)
    rest = teacher.copy()
    np.put_along_axis(rest, order, -np.inf, axis=1)
    tail = np.logaddexp.reduce(rest, axis=1) if k < v else np.full(n, -np.inf)  # (N,)
    rows = np.arange(n)
    if extreme in ("floor", "all"):  # teacher log-probs of -1e4: zero mass in fp32
        lp[rows % 2 == 0, k // 2 :] = -1e4
        tail[rows % 3 == 0] = -1e4
    if extreme in ("full_mass", "all"):  # the top k hold all the mass: tail -inf
        sel = rows % 2 == 1
        lp[sel] -= np.logaddexp.reduce(lp[sel], axis=1, keepdims=True)
        tail[sel] = -np.inf
    z = rng.normal(size=(n, v)) * logit_scale
    if extreme in ("logits", "all") and n:
        z[rows, rng.integers(0, v, size=n)] = 1e4  # a student certain of one token
        z[rows % 2 == 0, 0] = -1e4
    return (
        torch.tensor(z, dtype=torch.float32),
        torch.tensor(rng.integers(0, v, size=n)),
        torch.tensor(order),
        torch.tensor(lp, dtype=torch.float32),
        torch.tensor(tail, dtype=torch.float32),
    )


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 24),
    v=st.integers(2, 48),
    k_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
    extreme=st.sampled_from(["none", "floor", "full_mass", "logits", "all"]),
    logit_scale=st.sampled_from([0.1, 3.0, 100.0]),
    tail=st.sampled_from(["bucket", "renorm"]),
    lam=st.floats(0.0, 4.0),
    chunk_size=st.integers(1, 30),
)
def test_fused_loss_equals_reference_and_is_finite(n, v, k_frac, seed, extreme, logit_scale, tail, lam, chunk_size):
    k = max(1, min(v, round(k_frac * v)))
    z, labels, ids, lp, tl = loss_case(n, v, k, seed, extreme, logit_scale)
    w_ce, w_kl = loss_weights(lam, "add")

    z_ref = z.clone().requires_grad_(True)
    ce = ce_sum(z_ref, labels)
    kl = topk_kl_sum(z_ref, ids, lp, tl, tail=tail)
    (w_ce * ce + w_kl * kl).backward()

    z_fused = z.clone().requires_grad_(True)
    out = fused_ce_kl_sums(
        z_fused, labels, ids, lp, tl, ce_weight=w_ce, kl_weight=w_kl, tail=tail, chunk_size=chunk_size
    )
    out.total.backward()

    for t in (out.total, out.ce, out.kl, z_fused.grad, ce, kl, z_ref.grad):
        assert torch.isfinite(t).all()
    assert out.kl.item() >= -1e-5 * max(n, 1) and kl.item() >= -1e-5 * max(n, 1), "KL >= 0 up to fp32 rounding"
    torch.testing.assert_close(out.ce, ce.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.kl, kl.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.total, (w_ce * ce + w_kl * kl).detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(z_fused.grad, z_ref.grad, rtol=1e-4, atol=1e-5)
