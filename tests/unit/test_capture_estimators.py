"""Capture modes as KL estimators: the sampled and hybrid targets give an unbiased gradient of the
exact KL(teacher‖student); top-k + tail is biased (asserted, not hidden); top-p keeps its mass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stage1_teacher.capture_modes import apply_top_p, distinct_draws, draw_uniforms, hybrid_entries
from stage2_student.batch import with_kl_target_weights
from stage2_student.losses import fused_ce_kl_sums

V, K_HEAD = 40, 5


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    t_logits = torch.randn(3, V, generator=g) * 1.5  # 3 positions, flat and peaked
    t_logits[0] *= 3
    p = torch.softmax(t_logits.double(), -1)
    z = (torch.randn(3, V, generator=g)).requires_grad_(True)
    exact = torch.softmax(z.detach().double(), -1) - p  # d KL(p‖q) / dz
    return p, z, exact


def _grad(z, batch):
    z = z.detach().clone().requires_grad_(True)
    total = fused_ce_kl_sums(
        z,
        torch.zeros(len(z), dtype=torch.long),
        batch["topk_ids"],
        batch["topk_logprobs"],
        batch["tail_logprob"],
        ce_weight=0.0,
        kl_weight=1.0,
    ).total
    total.backward()
    return z.grad.double()


def _draws(p, n_draws, rng, restrict_to=None):
    probs = p.numpy().copy()
    if restrict_to is not None:
        probs = probs * restrict_to
    cdf = np.cumsum(probs, axis=1)
    u = 1.0 - rng.random((len(p), n_draws))
    ids = np.minimum((cdf[:, None, :] < (u * cdf[:, -1:])[:, :, None]).sum(-1), V - 1)
    return ids.astype(np.int32), np.log(p.numpy())[np.arange(len(p))[:, None], ids].astype(np.float32)


@pytest.mark.parametrize("mode", ["sample", "hybrid"])
def test_sampled_estimators_are_unbiased(mode):
    p, z, exact = _setup()
    rng = np.random.default_rng(0)
    lp = torch.log(p).float()
    head_lp, head_ids = lp.topk(K_HEAD, -1)
    tail_mask = np.ones((3, V))
    tail_mask[np.arange(3)[:, None], head_ids.numpy()] = 0
    head_tail = torch.log((p * torch.tensor(tail_mask)).sum(-1)).float().numpy()
    grads = []
    for _ in range(1000):
        if mode == "sample":
            d_ids, d_lp = _draws(p, 8, rng)
            ids, lps, counts = distinct_draws(d_ids, d_lp, 8)
            tail = np.full(3, -np.inf, dtype=np.float32)
        else:
            d_ids, d_lp = _draws(p, 4, rng, restrict_to=tail_mask)
            ids, lps, tail, counts = hybrid_entries(head_ids.numpy(), head_lp.numpy(), head_tail, d_ids, d_lp, 4)
        batch = with_kl_target_weights(
            {
                "topk_ids": torch.from_numpy(ids.astype(np.int64)),
                "topk_logprobs": torch.from_numpy(lps),
                "tail_logprob": torch.from_numpy(tail),
                "sample_counts": torch.from_numpy(counts),
            },
            {"mode": mode},
        )
        grads.append(_grad(z, batch))
    g = torch.stack(grads)  # (R, 3, V)
    R = len(g)
    # The gradient coordinate is q_j − w_j, so its variance is Var(w_j): binomial counts. The empirical
    # spread underestimates it for tokens drawn a handful of times, so take the larger of the two.
    if mode == "sample":
        var_w = p * (1 - p) / 8
    else:
        p_T = (p * torch.tensor(tail_mask)).sum(-1, keepdim=True)
        var_w = torch.where(torch.tensor(tail_mask) > 0, p * (p_T - p) / 4, torch.zeros_like(p))
    mean = g.mean(0)
    se = torch.maximum(g.std(0), var_w.sqrt()) / np.sqrt(R)
    # Unbiased: within 5 standard errors everywhere, over 120 coordinates, plus 1e-5 of fp32 slack (the
    # loss works in fp32; never-drawn tokens have a zero standard error).
    excess = (mean - exact).abs() - 5 * se
    assert (excess <= 1e-5).all(), float(excess.max())
    # ... and the spread is real: the test could fail if a target were off by a few percent.
    assert (se.max() > 1e-4) and ((mean - exact).abs().max() < 0.02)


def test_topk_tail_bucket_is_biased_and_the_bias_is_the_tail_shape():
    p, z, exact = _setup()
    lp = torch.log(p).float()
    ids_t, lps_t = lp.topk(K_HEAD, -1)[1], lp.topk(K_HEAD, -1)[0]
    tail = torch.log(1 - torch.exp(lps_t.double()).sum(-1)).float()
    g = _grad(z, {"topk_ids": ids_t.long(), "topk_logprobs": lps_t, "tail_logprob": tail})
    bias = g - exact
    q = torch.softmax(z.detach().double(), -1)
    in_head = torch.zeros(3, V, dtype=torch.bool)
    in_head[torch.arange(3)[:, None], ids_t] = True
    q_T = (q * ~in_head).sum(-1, keepdim=True)
    p_T = torch.exp(tail.double())[:, None]
    # Outside the top k the bucket pushes every token by q_j (1 - p_T / q_T) instead of q_j - p_j.
    expected = torch.where(in_head, torch.zeros_like(q), q * (1 - p_T / q_T) - (q - p))
    torch.testing.assert_close(bias, expected, atol=1e-5, rtol=1e-4)
    assert bias.abs().max() > 1e-3, "the top-k + tail estimator is biased on this distribution"
    # The total gradient mass on the tail is still right: the bucket matches p_T in aggregate.
    torch.testing.assert_close((g * ~in_head).sum(-1), (exact * ~in_head).sum(-1), atol=1e-5, rtol=1e-4)


def test_top_p_keeps_mass_and_bounds():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 200)) * rng.uniform(0.5, 4, size=(50, 1))
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    order = np.argsort(-lp, axis=1)[:, :64]
    top_lp = np.take_along_axis(lp, order, axis=1)
    tail = np.log(1 - np.exp(top_lp).sum(1))
    ids, lps, new_tail = apply_top_p(order, top_lp.astype(np.float32), tail.astype(np.float32), 0.9, 4)
    n = (ids >= 0).sum(1)
    mass = np.exp(lps.astype(np.float64)).sum(1)
    assert (n >= 4).all() and (n <= 64).all() and len(set(n)) > 5, "variable k"
    reached = np.exp(top_lp).sum(1) >= 0.9
    assert (mass[reached & (n > 4)] >= 0.9 - 1e-6).all()
    np.testing.assert_allclose(mass + np.exp(new_tail.astype(np.float64)), 1.0, atol=1e-5)
    # Minimal: one entry fewer would miss top_p (where more than min_k were kept).
    shorter = np.array([np.exp(top_lp[i, : n[i] - 1]).sum() for i in range(50)])
    assert (shorter[(n > 4) & reached] < 0.9).all()


def test_draws_depend_on_seed_and_sample_only():
    a = draw_uniforms(3, 17, 10, 4)
    assert np.array_equal(a, draw_uniforms(3, 17, 10, 4)) and not np.array_equal(a, draw_uniforms(3, 18, 10, 4))
    assert (a > 0).all() and (a <= 1).all()


def test_distinct_draws_counts():
    d = np.array([[5, 3, 5, 5, -1], [2, 2, 2, 2, 2]])
    lp = np.array([[-1.0, -2.0, -1.0, -1.0, 0.0], [-0.1] * 5], dtype=np.float32)
    ids, lps, counts = distinct_draws(d, lp, 5)
    assert ids[0].tolist() == [5, 3, -1, -1, -1] and counts[0].tolist() == [3, 1, 0, 0, 0]
    assert ids[1].tolist() == [2, -1, -1, -1, -1] and counts[1].tolist() == [5, 0, 0, 0, 0]
    assert np.isneginf(lps[0, 2:]).all()


def test_every_registered_mode_has_its_numerics():
    from stage1_teacher.capture_modes import STORE
    from storage import MODES

    assert list(STORE) == list(MODES)
