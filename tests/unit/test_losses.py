"""Stage-2 losses: values against hand/numpy references, gradients against autograd, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stage2_student.losses import (
    LOG_PROB_FLOOR,
    ce_sum,
    exact_kl_sum,
    fused_ce_kl_sums,
    loss_weights,
    topk_jsd_sum,
    topk_kl_sum,
    topk_reverse_kl_sum,
    total_loss_sum,
)

NEG_INF = float("-inf")
DIVERGENCES = {"forward": topk_kl_sum, "reverse": topk_reverse_kl_sum, "jsd": topk_jsd_sum}


# ---------------------------------------------------------------------------------------------------
# helpers: synthetic teacher data and float64 numpy references written independently of the module


def make_case(n, v, k, seed, *, pad_prob=0.0, logit_scale=3.0, dtype=torch.float32):
    """Student logits, labels, teacher full log-probs and its top-k (sorted, with random padded slots).

    The tail is the teacher mass outside the *kept* ids, as stage 1 would store it for variable k.
    """
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(n, v)) * logit_scale
    teacher = teacher - np.logaddexp.reduce(teacher, axis=1, keepdims=True)  # (N, V) float64 log-probs
    order = np.argsort(-teacher, axis=1)[:, :k]
    ids = order.copy()
    lp = np.take_along_axis(teacher, order, axis=1)
    pad = rng.random((n, k)) < pad_prob
    ids[pad] = -1
    lp[pad] = -np.inf
    tail = np.empty(n)
    for r in range(n):
        outside = np.ones(v, bool)
        outside[ids[r][ids[r] >= 0]] = False
        tail[r] = np.logaddexp.reduce(teacher[r][outside]) if outside.any() else -np.inf
    z = torch.tensor(rng.normal(size=(n, v)) * logit_scale, dtype=torch.float32).to(dtype)
    labels = torch.tensor(rng.integers(0, v, size=n), dtype=torch.int64)
    return dict(
        z=z,
        labels=labels,
        teacher=torch.tensor(teacher, dtype=torch.float32),
        ids=torch.tensor(ids, dtype=torch.int64),
        lp=torch.tensor(lp, dtype=torch.float32),
        tail=torch.tensor(tail, dtype=torch.float32),
    )


def _lse(x):
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0 or np.all(x == -np.inf):
        return -np.inf
    m = x.max()
    return m + math.log(np.exp(x - m).sum())


def np_categories(z_row, ids_row, lp_row, tail_lp, tail, tau):
    """(teacher log-probs, student log-probs, student category exists) over the categories, by loops."""
    z = np.asarray(z_row, np.float64) / tau
    s = z - _lse(z)
    keep = [j for j, i in enumerate(ids_row) if i >= 0]
    a = [lp_row[j] / tau for j in keep]
    if tail == "bucket":
        a.append(tail_lp / tau)
    a = np.array(a, np.float64)
    a = a - _lse(a) if np.isfinite(a).any() else a
    topk = [int(ids_row[j]) for j in keep]
    if tail == "bucket":
        rest = [s[j] for j in range(len(s)) if j not in topk]
        log_qt = _lse(rest) if rest else -np.inf
        b = np.array([s[i] for i in topk] + [max(log_qt, LOG_PROB_FLOOR)])
        exists = np.array([True] * len(topk) + [bool(rest)])
    else:
        zs = np.array([s[i] for i in topk])
        b = zs - _lse(zs)
        exists = np.ones(len(topk), bool)
    return a, b, exists


def np_divergence(z, ids, lp, tail_lp, *, tail="bucket", tau=1.0, kind="forward"):
    total = 0.0
    for r in range(len(ids)):
        a, b, exists = np_categories(z[r], ids[r], lp[r], tail_lp[r], tail, tau)
        if not np.isfinite(a).any():
            continue
        p = np.exp(a)
        q = np.where(exists, np.exp(b), 0.0)
        if kind == "forward":
            total += sum(pi * (ai - bi) for pi, ai, bi in zip(p, a, b) if pi > 0)
        elif kind == "reverse":
            total += sum(qi * (bi - max(ai, LOG_PROB_FLOOR)) for qi, ai, bi in zip(q, a, b) if qi > 0)
        else:
            m = (p + q) / 2
            total += 0.5 * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m) if pi > 0)
            total += 0.5 * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m) if qi > 0)
    return total * tau**2


def np_args(c):
    return (c["z"].double().numpy(), c["ids"].numpy(), c["lp"].double().numpy(), c["tail"].double().numpy())


def reference_total(c, z, *, w_ce, w_kl, tail, tau):
    """Unfused autograd reference of w_ce·CE + w_kl·KL."""
    kl = topk_kl_sum(z, c["ids"], c["lp"], c["tail"], tail=tail, kd_temperature=tau)
    ce = ce_sum(z, c["labels"])
    return w_ce * ce + w_kl * kl, ce, kl


def grad_of(fn, z):
    z = z.detach().clone().requires_grad_(True)
    out = fn(z)
    out.backward()
    return out.detach(), z.grad


# ---------------------------------------------------------------------------------------------------
# values and gradients of the autograd versions


def test_full_vocab_topk_bucket_kl_is_exact_kl_value_and_gradient():
    c = make_case(n=6, v=11, k=11, seed=0)
    assert torch.all(c["tail"] == NEG_INF)
    val, g = grad_of(lambda z: topk_kl_sum(z, c["ids"], c["lp"], c["tail"]), c["z"])
    ref, g_ref = grad_of(lambda z: exact_kl_sum(z, c["teacher"]), c["z"])
    torch.testing.assert_close(val, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    # and the exact reference itself, against float64 numpy
    t, s = c["teacher"].double().numpy(), torch.log_softmax(c["z"].double(), 1).numpy()
    assert ref.item() == pytest.approx(float((np.exp(t) * (t - s)).sum()), rel=1e-5)


def test_bucket_kl_hand_worked_example():
    # One position, V = 4, k = 2. Teacher p = (0.5, 0.3 | tail 0.2); student logits give q = softmax.
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    ids = torch.tensor([[1, 0]])  # sorted by teacher prob: id 1 first
    lp = torch.log(torch.tensor([[0.5, 0.3]]))
    tail = torch.log(torch.tensor([0.2]))
    e = [math.exp(x) for x in (2.0, 1.0, 0.0, -1.0)]
    q = [x / sum(e) for x in e]
    q_tail = q[2] + q[3]
    want = 0.5 * math.log(0.5 / q[1]) + 0.3 * math.log(0.3 / q[0]) + 0.2 * math.log(0.2 / q_tail)
    assert topk_kl_sum(z, ids, lp, tail).item() == pytest.approx(want, rel=1e-6)
    # renorm: teacher (0.5, 0.3)/0.8 vs student (q1, q0)/(q0 + q1)
    qs = q[0] + q[1]
    want_r = 0.625 * math.log(0.625 / (q[1] / qs)) + 0.375 * math.log(0.375 / (q[0] / qs))
    assert topk_kl_sum(z, ids, lp, tail, tail="renorm").item() == pytest.approx(want_r, rel=1e-6)


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_divergences_match_numpy_loops(tail, tau, kind):
    c = make_case(n=9, v=13, k=4, seed=1, pad_prob=0.25)
    got = DIVERGENCES[kind](c["z"], c["ids"], c["lp"], c["tail"], tail=tail, kd_temperature=tau)
    want = np_divergence(*np_args(c), tail=tail, tau=tau, kind=kind)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_renorm_is_kl_of_renormalised_distributions():
    c = make_case(n=7, v=10, k=3, seed=2)
    s = torch.log_softmax(c["z"].double(), 1).gather(1, c["ids"])
    p = torch.softmax(c["lp"].double(), 1)
    q = torch.softmax(s, 1)
    want = (p * (p.log() - q.log())).sum()
    got = topk_kl_sum(c["z"], c["ids"], c["lp"], c["tail"], tail="renorm")
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_jsd_is_bounded_and_divergences_vanish_when_student_matches_teacher():
    c = make_case(n=8, v=12, k=12, seed=3)
    z = c["teacher"].clone()  # student == teacher (k = V, so the categories are the full vocabulary)
    for fn in DIVERGENCES.values():
        assert abs(fn(z, c["ids"], c["lp"], c["tail"]).item()) < 1e-5
    far = make_case(n=8, v=12, k=3, seed=4, logit_scale=20.0)
    jsd = topk_jsd_sum(far["z"], far["ids"], far["lp"], far["tail"])
    assert 0 <= jsd.item() <= 8 * math.log(2) + 1e-5


def test_bucket_tail_is_accurate_when_student_is_confident_in_the_topk():
    # q_T ≈ 1e-12: 1 − Σ_S q_i rounds to 0 in fp32, so log1p(−exp(logsumexp_S s)) would give −inf.
    z = torch.tensor([[30.0, 29.0, 2.0, 1.0, 0.0]])
    ids, lp = torch.tensor([[0, 1]]), torch.log(torch.tensor([[0.6, 0.3]]))
    tail = torch.log(torch.tensor([0.1]))
    want = np_divergence(z.double().numpy(), ids.numpy(), lp.double().numpy(), tail.double().numpy())
    assert topk_kl_sum(z, ids, lp, tail).item() == pytest.approx(want, rel=1e-6)
    total, _, kl = fused_ce_kl_sums(z, torch.tensor([0]), ids, lp, tail)
    assert kl.item() == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# the fused path equals the autograd reference


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("loss_form,lam", [("add", 0.7), ("mix", 0.3), ("add", 0.0)])
@pytest.mark.parametrize("chunk_size", [1, 4, 13, 1024])  # 4 does not divide N = 13
def test_fused_equals_reference_fp32(tail, tau, loss_form, lam, chunk_size):
    c = make_case(n=13, v=17, k=5, seed=5, pad_prob=0.2)
    c["ids"][0], c["lp"][0], c["tail"][0] = -1, NEG_INF, NEG_INF  # a row with no teacher mass at all
    c["tail"][1] = NEG_INF  # p_T = 0 with k < V
    w_ce, w_kl = loss_weights(lam, loss_form)
    ref, g_ref = grad_of(lambda z: reference_total(c, z, w_ce=w_ce, w_kl=w_kl, tail=tail, tau=tau)[0], c["z"])
    _, ref_ce, ref_kl = reference_total(c, c["z"], w_ce=w_ce, w_kl=w_kl, tail=tail, tau=tau)

    z = c["z"].clone().requires_grad_(True)
    out = fused_ce_kl_sums(
        z,
        c["labels"],
        c["ids"],
        c["lp"],
        c["tail"],
        ce_weight=w_ce,
        kl_weight=w_kl,
        tail=tail,
        kd_temperature=tau,
        chunk_size=chunk_size,
    )
    assert out.ce.requires_grad is False and out.kl.requires_grad is False
    out.total.backward()
    torch.testing.assert_close(out.total, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ce, ref_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kl, ref_kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.total, total_loss_sum(out.ce, out.kl, lam, loss_form), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z.grad, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_fused_equals_reference_bf16(tail, tau):
    c = make_case(n=21, v=40, k=6, seed=6, pad_prob=0.2, dtype=torch.bfloat16)
    ref, g_ref = grad_of(lambda z: reference_total(c, z, w_ce=1.0, w_kl=1.5, tail=tail, tau=tau)[0], c["z"])
    z = c["z"].clone().requires_grad_(True)
    out = fused_ce_kl_sums(
        z, c["labels"], c["ids"], c["lp"], c["tail"], kl_weight=1.5, tail=tail, kd_temperature=tau, chunk_size=8
    )
    out.total.backward()
    assert z.grad.dtype == torch.bfloat16 and out.total.dtype == torch.float32
    torch.testing.assert_close(out.total, ref, rtol=1e-5, atol=1e-4)  # both upcast the same bf16 values
    torch.testing.assert_close(z.grad.float(), g_ref.float(), rtol=2e-2, atol=2e-3)


def test_fused_gradient_scales_with_upstream_gradient_and_flows_through_a_graph():
    c = make_case(n=10, v=15, k=4, seed=7)
    w = torch.randn(15, 15, generator=torch.Generator().manual_seed(0))
    _, g_ref = grad_of(lambda z: reference_total(c, z, w_ce=1.0, w_kl=1.0, tail="bucket", tau=1.0)[0], c["z"] @ w)
    h = c["z"].clone().requires_grad_(True)
    out = fused_ce_kl_sums(h @ w, c["labels"], c["ids"], c["lp"], c["tail"])
    (out.total * 3.0 / 10).backward()
    torch.testing.assert_close(h.grad, (g_ref @ w.T) * 3.0 / 10, rtol=1e-4, atol=1e-5)


def test_fused_without_grad_and_backward_twice_raises():
    c = make_case(n=5, v=9, k=3, seed=8)
    with torch.no_grad():
        out = fused_ce_kl_sums(c["z"].requires_grad_(True), c["labels"], c["ids"], c["lp"], c["tail"])
    assert not out.total.requires_grad
    z = c["z"].detach().clone().requires_grad_(True)
    out = fused_ce_kl_sums(z, c["labels"], c["ids"], c["lp"], c["tail"])
    out.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.total.backward()


def test_exact_kl_of_teacher_with_itself_is_zero_and_topk_kl_on_teacher_logits_is_small():
    c = make_case(n=6, v=30, k=8, seed=9)
    assert abs(exact_kl_sum(c["teacher"], c["teacher"]).item()) < 1e-5
    # A student equal to the teacher has zero bucket KL too: each bucket matches exactly.
    assert abs(topk_kl_sum(c["teacher"], c["ids"], c["lp"], c["tail"]).item()) < 1e-5


# ---------------------------------------------------------------------------------------------------
# edge cases: empty, p_T = 0, extremes, padding


def _all_losses(c, z, tail="bucket", tau=1.0):
    """Every loss as a dict name -> (value, grad), including the fused path."""
    out = {"ce": grad_of(lambda x: ce_sum(x, c["labels"]), z)}
    for name, fn in DIVERGENCES.items():
        out[name] = grad_of(lambda x, fn=fn: fn(x, c["ids"], c["lp"], c["tail"], tail=tail, kd_temperature=tau), z)
    out["fused"] = grad_of(
        lambda x: (
            fused_ce_kl_sums(
                x, c["labels"], c["ids"], c["lp"], c["tail"], tail=tail, kd_temperature=tau, chunk_size=3
            ).total
        ),
        z,
    )
    return out


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_no_positions_gives_zero_and_zero_grad(tail):
    c = make_case(n=0, v=9, k=4, seed=10)
    assert c["z"].shape == (0, 9)
    for name, (val, g) in _all_losses(c, c["z"], tail=tail, tau=2.0).items():
        assert val.item() == 0.0, name
        assert g.shape == (0, 9), name
    assert exact_kl_sum(c["z"], c["teacher"]).item() == 0.0


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_zero_tail_mass_is_finite_and_contributes_nothing(tail):
    c = make_case(n=6, v=10, k=4, seed=11)
    c["tail"][:] = NEG_INF
    for name, (val, g) in _all_losses(c, c["z"], tail=tail).items():
        assert torch.isfinite(val) and torch.isfinite(g).all(), name
    # Forward bucket KL with p_T = 0 is Σ_S p̂ (log p̂ − s): the tail term adds exactly nothing.
    s = torch.log_softmax(c["z"].double(), 1).gather(1, c["ids"])
    p = torch.softmax(c["lp"].double(), 1)  # the module renormalises the k+1 teacher categories
    want = (p * (p.log() - s)).sum().item()
    assert topk_kl_sum(c["z"], c["ids"], c["lp"], c["tail"]).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_extreme_logprobs_and_logits_stay_finite(tail):
    c = make_case(n=8, v=12, k=5, seed=12)
    c["lp"][:, 3:] = -1e4  # teacher slots with (numerically) zero mass
    c["tail"][::2] = -1e4
    z = c["z"].clone()
    z[0] = -1e4
    z[1, :6] = 1e4  # student all but certain of a few ids
    z[2, c["ids"][2]] = 1e4  # student's tail ≈ e^-1e4: below the floor
    z[3] = torch.linspace(-1e4, 1e4, 12)
    results = _all_losses(c, z, tail=tail, tau=0.5)
    for name, (val, g) in results.items():
        assert torch.isfinite(val) and torch.isfinite(g).all(), name
    ref, g_ref = grad_of(lambda x: reference_total(c, x, w_ce=1.0, w_kl=1.0, tail=tail, tau=0.5)[0], z)
    torch.testing.assert_close(results["fused"][0], ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(results["fused"][1], g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_padded_slots_are_ignored(tail):
    c = make_case(n=7, v=16, k=4, seed=13)
    # Insert padded columns at scattered places; the loss must equal the unpadded one, value and grad.
    n = c["ids"].shape[0]
    pad_ids = torch.full((n, 3), -1)
    pad_lp = torch.full((n, 3), NEG_INF)
    padded = dict(c)
    padded["ids"] = torch.cat([pad_ids[:, :1], c["ids"][:, :2], pad_ids[:, 1:], c["ids"][:, 2:]], 1)
    padded["lp"] = torch.cat([pad_lp[:, :1], c["lp"][:, :2], pad_lp[:, 1:], c["lp"][:, 2:]], 1)
    plain, with_pad = _all_losses(c, c["z"], tail=tail, tau=2.0), _all_losses(padded, c["z"], tail=tail, tau=2.0)
    for name in plain:
        torch.testing.assert_close(with_pad[name][0], plain[name][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(with_pad[name][1], plain[name][1], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# sums are additive over positions: gradient accumulation is exact


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_sums_are_additive_over_splits_and_accumulation_matches_one_batch(tail):
    c = make_case(n=12, v=14, k=4, seed=14, pad_prob=0.2)
    splits = [slice(0, 5), slice(5, 6), slice(6, 12)]

    def part(sl):
        return {key: val[sl] for key, val in c.items()}

    for name in ["ce", "forward", "reverse", "jsd", "fused"]:
        whole_val, whole_g = _all_losses(c, c["z"], tail=tail)[name]
        vals, grads = zip(*(_all_losses(part(sl), c["z"][sl], tail=tail)[name] for sl in splits))
        torch.testing.assert_close(sum(vals), whole_val, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(torch.cat(grads), whole_g, rtol=1e-6, atol=1e-7)

    # One optimiser step: one batch / its trained count vs micro-batches accumulated / the global count.
    torch.manual_seed(0)
    head = torch.nn.Linear(14, 14)
    x = torch.randn(12, 14)

    def loss_sum(sl):
        return fused_ce_kl_sums(
            head(x[sl]), c["labels"][sl], c["ids"][sl], c["lp"][sl], c["tail"][sl], tail=tail, chunk_size=4
        ).total

    head.zero_grad()
    (loss_sum(slice(0, 12)) / 12).backward()
    one_batch = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    for sl in splits:
        (loss_sum(sl) / 12).backward()
    for g_acc, g_one in zip((p.grad for p in head.parameters()), one_batch):
        torch.testing.assert_close(g_acc, g_one, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# combination and validation


def test_loss_weights_and_total():
    assert loss_weights(0.5, "add") == (1.0, 0.5)
    assert loss_weights(0.25, "mix") == (0.75, 0.25)
    ce, kl = torch.tensor(2.0), torch.tensor(4.0)
    assert total_loss_sum(ce, kl, 0.5).item() == pytest.approx(4.0)
    assert total_loss_sum(ce, kl, 0.25, "mix").item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="negative weight"):
        loss_weights(1.5, "mix")
    with pytest.raises(ValueError, match="loss_form"):
        loss_weights(0.5, "mean")
    with pytest.raises(ValueError, match=">= 0"):
        loss_weights(-1.0)


def test_invalid_inputs_name_every_problem():
    c = make_case(n=4, v=8, k=3, seed=15)
    with pytest.raises(ValueError) as err:
        topk_kl_sum(c["z"], c["ids"][:3], c["lp"], c["tail"], tail="mean", kd_temperature=0.0)
    msg = str(err.value)
    assert "topk_ids" in msg and "topk_logprobs" in msg and "tail='mean'" in msg and "kd_temperature" in msg
    with pytest.raises(ValueError, match="labels"):
        fused_ce_kl_sums(c["z"], c["labels"][:2], c["ids"], c["lp"], c["tail"])
    with pytest.raises(ValueError, match="chunk_size"):
        fused_ce_kl_sums(c["z"], c["labels"], c["ids"], c["lp"], c["tail"], chunk_size=0)


# ---------------------------------------------------------------------------------------------------
# property test


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 40),
    v=st.integers(5, 64),
    k_frac=st.floats(0.0, 1.0),
    pad_prob=st.sampled_from([0.0, 0.3, 0.9]),
    seed=st.integers(0, 2**31 - 1),
    tail=st.sampled_from(["bucket", "renorm"]),
    tau=st.sampled_from([1.0, 0.5, 3.0]),
    chunk_size=st.integers(1, 50),
    lam=st.floats(0.0, 1.0),
    loss_form=st.sampled_from(["add", "mix"]),
)
def test_property_fused_equals_reference_and_kl_nonnegative(
    n, v, k_frac, pad_prob, seed, tail, tau, chunk_size, lam, loss_form
):
    k = max(1, min(v, round(k_frac * v)))
    c = make_case(n, v, k, seed, pad_prob=pad_prob)
    w_ce, w_kl = loss_weights(lam, loss_form)
    ref, g_ref = grad_of(lambda z: reference_total(c, z, w_ce=w_ce, w_kl=w_kl, tail=tail, tau=tau)[0], c["z"])
    z = c["z"].clone().requires_grad_(True)
    out = fused_ce_kl_sums(
        z,
        c["labels"],
        c["ids"],
        c["lp"],
        c["tail"],
        ce_weight=w_ce,
        kl_weight=w_kl,
        tail=tail,
        kd_temperature=tau,
        chunk_size=chunk_size,
    )
    out.total.backward()
    torch.testing.assert_close(out.total, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(z.grad, g_ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(z.grad).all()
    # ≥ 0 up to fp32 rounding of the log-probs (~1e-7 per position), which τ² scales along with the KL.
    floor = -1e-6 * tau**2 * max(n, 1)
    assert out.kl.item() >= floor
    for fn in DIVERGENCES.values():
        assert fn(c["z"], c["ids"], c["lp"], c["tail"], tail=tail, kd_temperature=tau).item() >= floor
    want_kl = np_divergence(*np_args(c), tail=tail, tau=tau)
    assert out.kl.item() == pytest.approx(want_kl, rel=1e-5, abs=1e-4)


# ---------------------------------------------------------------------------------------------------
# sampled labels (#24): the logged KL is an unbiased estimate of the exact KL; unsupported combinations refused


def _sampled_batch(mode, logp, draws, head_k, seed):
    """The stored entries of `mode` (sample / hybrid) for teacher log-probs logp (N, V), as stage 1 stores them
    (`stage1_teacher.capture_modes`), collated as `batch.collate_labels` would."""
    from stage1_teacher.capture_modes import distinct_draws, hybrid_entries

    rng = np.random.default_rng(seed)
    n, v = logp.shape
    p = np.exp(logp)
    order = np.argsort(-logp, axis=1)
    head = order[:, :head_k]
    draw_ids = np.empty((n, draws), dtype=np.int64)
    for i in range(n):
        q = p[i].copy()
        q[head[i]] = 0.0  # hybrid draws from the tail only
        draw_ids[i] = rng.choice(v, size=draws, p=q / q.sum())
    draw_lp = np.take_along_axis(logp, draw_ids, axis=1).astype(np.float32)
    if mode == "sample":
        ids, lps, counts = distinct_draws(draw_ids, draw_lp, draws)
        tail = np.full(n, -np.inf, np.float32)  # what the loss sees of it is replaced by the target anyway
    else:
        head_lp = np.take_along_axis(logp, head, axis=1)
        head_tail = np.log1p(-np.exp(head_lp).sum(axis=1))
        ids, lps, tail, counts = hybrid_entries(head, head_lp, head_tail, draw_ids, draw_lp, draws)
    return {
        "topk_ids": torch.from_numpy(ids.astype(np.int64)),
        "topk_logprobs": torch.from_numpy(lps.astype(np.float32)),
        "tail_logprob": torch.from_numpy(tail.astype(np.float32)),
        "sample_counts": torch.from_numpy(counts),
    }


@pytest.mark.parametrize("mode, head_k", [("sample", 0), ("hybrid", 4)])
def test_logged_kl_of_sampled_labels_estimates_the_exact_kl(mode, head_k):
    """What metrics.jsonl logs as `kl` (the loss's KL(w‖q) + kl_offset) is an unbiased estimate of the exact
    full-vocabulary KL(p‖q): within 4 standard errors of it; the loss value itself is not (it is biased up)."""
    from stage2_student.batch import with_kl_target_weights

    n, v, draws = 3000, 40, 8
    gen = np.random.default_rng(0)
    logp = gen.normal(size=(n, v)) * 2.0
    logp -= np.logaddexp.reduce(logp, axis=1, keepdims=True)
    z = torch.from_numpy(logp + 0.7 * gen.normal(size=(n, v))).float()  # a student near the teacher
    capture = {"mode": mode, "draws": draws, "seed": 0, "head_k": head_k}
    target = with_kl_target_weights(_sampled_batch(mode, logp, draws, head_k, seed=1), capture)
    loss_kl = float(topk_kl_sum(z, target["topk_ids"], target["topk_logprobs"], target["tail_logprob"]))
    logged = loss_kl + float(target["kl_offset"].sum())
    exact = float(exact_kl_sum(z, torch.from_numpy(logp).float()))
    # standard error of the sum: per position Var_{y~p}[log p(y) − log q(y)] / draws (for hybrid, over the
    # tail draws, scaled by p_T²; the head is exact; this bounds it from above)
    logq = torch.log_softmax(z.double(), 1).numpy()
    d = logp - logq
    var = (np.exp(logp) * d**2).sum(1) - ((np.exp(logp) * d).sum(1)) ** 2
    se = math.sqrt(var.sum() / draws)
    assert abs(logged - exact) < 4 * se, (logged, exact, se)
    assert loss_kl - exact > 10 * se, "the loss value alone is the biased quantity the log used to hold"


@pytest.mark.parametrize("mode, head_k", [("sample", 0), ("hybrid", 4)])
def test_logged_kl_is_zero_when_the_student_is_the_teacher(mode, head_k):
    from stage2_student.batch import with_kl_target_weights

    gen = np.random.default_rng(2)
    logp = gen.normal(size=(200, 30)) * 2.0
    logp -= np.logaddexp.reduce(logp, axis=1, keepdims=True)
    capture = {"mode": mode, "draws": 16, "seed": 0, "head_k": head_k}
    target = with_kl_target_weights(_sampled_batch(mode, logp, 16, head_k, seed=3), capture)
    z = torch.from_numpy(logp).float()
    loss_kl = topk_kl_sum(z, target["topk_ids"], target["topk_logprobs"], target["tail_logprob"])
    assert float(loss_kl) / 200 > 0.1  # the per-position KL(w‖q) of a student that IS the teacher
    assert abs(float(loss_kl + target["kl_offset"].sum()) / 200) < 1e-5


def test_topk_labels_get_no_kl_offset():
    from stage2_student.batch import with_kl_target_weights

    b = {"topk_ids": torch.tensor([[1, 2]]), "topk_logprobs": torch.tensor([[-0.5, -1.5]]), "tail_logprob": None}
    assert "kl_offset" not in with_kl_target_weights(b, {"mode": "topk"})


SAMPLED = {"sample": {"mode": "sample", "draws": 32, "seed": 0, "head_k": 0},
           "hybrid": {"mode": "hybrid", "draws": 8, "seed": 0, "head_k": 8}}  # fmt: skip


@pytest.mark.parametrize("mode", ["sample", "hybrid"])
@pytest.mark.parametrize(
    "kw, says",
    [
        ({"divergence": "reverse"}, ["--divergence reverse", "--divergence forward", "--capture topk"]),
        ({"divergence": "jsd"}, ["--divergence jsd", "--divergence forward", "--capture topk"]),
        ({"kd_temperature": 2.0}, ["--kd-temperature 2", "--kd-temperature 1", "--capture topk"]),
        ({"kl_tail": "renorm"}, ["--kl-tail renorm", "--kl-tail bucket"]),
    ],
)
def test_sampled_labels_refuse_biased_option_combinations(mode, kw, says):
    from stage2_student.config import StudentConfig

    cfg = StudentConfig(run_dir="r", out="o", **kw)
    with pytest.raises(ValueError) as e:
        cfg.check_run(SAMPLED[mode], "r")
    for s in [*says, f"captured as {mode}"]:
        assert s in str(e.value), (s, str(e.value))
    assert cfg.run_problems({"mode": "topk"}) == [] and cfg.run_problems({"mode": "topp"}) == []
    # the online teacher replaces the stored labels in the KL: nothing to refuse about them
    if "divergence" not in kw:
        assert cfg.replace(teacher_online="t").run_problems(SAMPLED[mode]) == []
    assert StudentConfig(run_dir="r", out="o").run_problems(SAMPLED[mode]) == []
