"""Stage-2 losses as plain autograd functions: CE, forward / reverse KL and JSD on the stored top-k (+ tail),
the exact full-vocabulary KL, and the CE + λ·KL combination.

The reference the fused path (`fused.py`) is tested against, and the only path for reverse KL and JSD.
Every function returns a SUM over positions (see the package docstring for why).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .categories import (
    LOG_PROB_FLOOR,
    check_inputs,
    forward_kl_rows,
    in_topk_mask,
    renorm_logprobs,
    teacher_logprobs,
    valid_and_safe_ids,
)

__all__ = [
    "ce_sum",
    "exact_kl_sum",
    "loss_weights",
    "topk_jsd_sum",
    "topk_kl_sum",
    "topk_reverse_kl_sum",
    "total_loss_sum",
]

_LOSS_FORMS = ("add", "mix")


# ---------------------------------------------------------------------------------------------------
# the student's categorical view (autograd)


def _student_logprobs(student_logits, ids, valid, tail, kd_temperature):
    """Student categorical log-probs B (N, M) (finite everywhere) and B_exists (N, M) bool (autograd).

    s = log_softmax(z / τ) over the full vocabulary (N, V).
    bucket: B = (s_1..s_k, log q_T) with q_T = Σ_{j∉S} q_j. log q_T is a logsumexp over the ids outside
      the top-k: exact even when q_S → 1, where log1p(-exp(logsumexp_S s)) cancels to -inf in fp32.
      No tail ids (k = V) or q_T below the floor: log q_T = LOG_PROB_FLOOR.
    renorm: B = log_softmax over the valid top-k of s_S (the full-vocab normaliser cancels).
    """
    z = student_logits.float()  # (N, V)
    if kd_temperature != 1.0:
        z = z / kd_temperature
    if tail == "renorm":
        return renorm_logprobs(z.gather(1, ids), valid), valid
    s = torch.log_softmax(z, dim=1)  # (N, V)
    s_topk = s.gather(1, ids)  # (N, k)
    in_topk = in_topk_mask(ids, valid, s.shape[1])  # (N, V)
    has_tail = ~in_topk.all(dim=1)  # (N,)
    # Rows without tail ids would logsumexp over only -inf (NaN gradient): give them finite input.
    s_tail = torch.where(has_tail[:, None], s.masked_fill(in_topk, float("-inf")), 0.0)  # (N, V)
    log_q_tail = torch.where(has_tail, torch.logsumexp(s_tail, dim=1), LOG_PROB_FLOOR)  # (N,)
    log_q_tail = log_q_tail.clamp(min=LOG_PROB_FLOOR)
    b = torch.cat([s_topk, log_q_tail[:, None]], dim=1)  # (N, k+1)
    return b, torch.cat([valid, has_tail[:, None]], dim=1)


# ---------------------------------------------------------------------------------------------------
# divergences between the categorical views; A may hold -inf, B is finite, B_exists marks real categories


def _reverse_kl_rows(a, b, b_exists):
    """(N,) Σ_c Q_c (B_c − max(A_c, floor)), Q = exp(B) over the student's categories."""
    q = torch.where(b_exists, b.exp(), 0.0)
    return torch.where(b_exists, q * (b - a.clamp(min=LOG_PROB_FLOOR)), 0.0).sum(dim=1)


def _jsd_rows(a, b, b_exists):
    """(N,) ½ Σ_c [P_c (A_c − log M_c) + Q_c (B_c − log M_c)], M = (P + Q)/2; bounded by log 2."""
    neg_inf = float("-inf")
    bx = torch.where(b_exists, b, neg_inf)
    present = (a > neg_inf) | b_exists
    log_m = torch.logaddexp(torch.where(present, a, 0.0), torch.where(present, bx, 0.0)) - math.log(2.0)
    p, q = a.exp(), bx.exp()
    term_p = torch.where(p > 0, p * (torch.where(p > 0, a, 0.0) - log_m), 0.0)
    term_q = torch.where(q > 0, q * (torch.where(q > 0, bx, 0.0) - log_m), 0.0)
    return 0.5 * (term_p + term_q).sum(dim=1)


def _topk_divergence_sum(
    divergence, student_logits, topk_ids, topk_logprobs, tail_logprob, tail, kd_temperature
) -> torch.Tensor:
    check_inputs(student_logits, topk_ids, topk_logprobs, tail_logprob, tail, kd_temperature)
    valid, ids = valid_and_safe_ids(topk_ids)
    a, has_mass = teacher_logprobs(topk_logprobs, tail_logprob, valid, tail, kd_temperature)  # (N, M)
    b, b_exists = _student_logprobs(student_logits, ids, valid, tail, kd_temperature)  # (N, M)
    if divergence == "forward":
        rows = forward_kl_rows(a, b)
    elif divergence == "reverse":
        rows = _reverse_kl_rows(a, b, b_exists)
    else:
        rows = _jsd_rows(a, b, b_exists)
    # τ² (Hinton et al. 2015) keeps the gradient's scale independent of τ: d/dz of a τ-tempered
    # divergence carries a 1/τ from z/τ and a further ~1/τ from the softened probabilities.
    return torch.where(has_mass, rows, 0.0).sum() * (kd_temperature**2)


# ---------------------------------------------------------------------------------------------------
# public: plain autograd versions


def ce_sum(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_n −log softmax(z_n)[y_n]: summed cross-entropy, a float32 scalar.

    student_logits (N, V), labels (N,) int64. Upcast to fp32 (a bf16 log-softmax loses ~2 digits).
    N = 0 gives 0.
    """
    return F.cross_entropy(student_logits.float(), labels.long(), reduction="sum")


def topk_kl_sum(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    *,
    tail: str = "bucket",
    kd_temperature: float = 1.0,
) -> torch.Tensor:
    """Forward KL(teacher‖student) on the stored top-k, summed over positions: a float32 scalar.

    student_logits (N, V); topk_ids, topk_logprobs (N, k); tail_logprob (N,). Per position, with S the
    valid top-k ids, t the teacher's and s = log_softmax(z) the student's full-vocabulary log-probs:

    tail="bucket" (default): KL over the k+1 categories (S, tail)
        Σ_{i∈S} p_i (t_i − s_i) + p_T (log p_T − log q_T),   q_T = Σ_{j∉S} q_j (computed exactly).
        p_T = 0 contributes exactly 0 with zero gradient. With k = V it is the exact KL.
    tail="renorm" (axolotl / DistillKit): KL(p̃‖q̃) with p̃, q̃ both renormalised over S. Cheaper but
        biased: it ignores where the student puts mass outside S (FINDINGS §1: 0.85 vs 0.994 gradient
        cosine at k = 32).

    kd_temperature τ: teacher categories A = log_softmax((t_S, log p_T)/τ) (the tail tempered as one
    category: an approximation, its inner distribution is unknown); student s = log_softmax(z/τ) over the
    full vocabulary, tail bucket from that; the KL is multiplied by τ² (Hinton) so gradient scale does
    not change with τ.
    """
    return _topk_divergence_sum("forward", student_logits, topk_ids, topk_logprobs, tail_logprob, tail, kd_temperature)


def topk_reverse_kl_sum(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    *,
    tail: str = "bucket",
    kd_temperature: float = 1.0,
) -> torch.Tensor:
    """Reverse KL(student‖teacher) on the (k+1)-bucket (or renormalised top-k) support: float32 scalar.

    Same inputs and categories as ``topk_kl_sum``: Σ_c Q_c (log Q_c − log P_c) over the student's
    categories. Cheap, but only a proxy: the true reverse KL sums over every token, and inside the tail
    the teacher's probabilities are unknown, so the student's tail is compared as one bucket.
    Teacher log-probs are floored at LOG_PROB_FLOOR (≈ −87.3): a category the teacher gives 0 mass
    (p_T = 0, a stored −1e4) costs a finite ≤ 87·Q_c nats instead of inf. Multiplied by τ².
    """
    return _topk_divergence_sum("reverse", student_logits, topk_ids, topk_logprobs, tail_logprob, tail, kd_temperature)


def topk_jsd_sum(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    *,
    tail: str = "bucket",
    kd_temperature: float = 1.0,
) -> torch.Tensor:
    """Jensen–Shannon divergence on the (k+1)-bucket (or renormalised top-k) support: float32 scalar.

    Same inputs and categories as ``topk_kl_sum``: ½ KL(P‖M) + ½ KL(Q‖M), M = (P + Q)/2, per position
    in [0, log 2]; needs no floor since M > 0 wherever P or Q is. Multiplied by τ².
    """
    return _topk_divergence_sum("jsd", student_logits, topk_ids, topk_logprobs, tail_logprob, tail, kd_temperature)


def exact_kl_sum(student_logits: torch.Tensor, teacher_logprobs_full: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary KL(teacher‖student) summed over positions: the online-teacher reference.

    student_logits (N, V); teacher_logprobs_full (N, V) teacher log-probs (used as given, not
    re-normalised). Σ_n Σ_v p_v (t_v − s_v), s = log_softmax(z); tokens with p_v = 0 contribute 0.
    Materialises (N, V) fp32 tensors: meant for evaluation and tests, not for large N·V.
    """
    s = torch.log_softmax(student_logits.float(), dim=1)  # (N, V)
    return forward_kl_rows(teacher_logprobs_full.float(), s).sum()


# ---------------------------------------------------------------------------------------------------
# public: combining CE and KL


def loss_weights(kl_weight: float, loss_form: str = "add") -> tuple[float, float]:
    """(ce_weight, kl_weight) for λ = kl_weight: "add" → (1, λ); "mix" → (1 − λ, λ)."""
    if loss_form not in _LOSS_FORMS:
        raise ValueError(f"loss_form={loss_form!r} is not one of {_LOSS_FORMS}")
    if not math.isfinite(kl_weight) or kl_weight < 0:
        raise ValueError(f"kl_weight={kl_weight!r} must be a finite number >= 0")
    if loss_form == "mix":
        if kl_weight > 1:
            raise ValueError(
                f"kl_weight={kl_weight!r} with loss_form='mix' gives CE a negative weight 1 − λ; "
                "use λ in [0, 1], or loss_form='add' for CE + λ·KL with λ > 1"
            )
        return 1.0 - kl_weight, kl_weight
    return 1.0, kl_weight


def total_loss_sum(
    ce_sum: torch.Tensor, kl_sum: torch.Tensor, kl_weight: float, loss_form: str = "add"
) -> torch.Tensor:
    """CE + λ·KL ("add") or (1 − λ)·CE + λ·KL ("mix") of two summed losses (scalars)."""
    w_ce, w_kl = loss_weights(kl_weight, loss_form)
    return w_ce * ce_sum + w_kl * kl_sum
