"""Stage-2 losses: cross-entropy on the targets plus a divergence to the frozen teacher's stored top-k.

Pure functions of tensors: no files, no models. Every input is already flattened to the N *trained
positions* of a micro-batch:

    student_logits  (N, V)  any float dtype (bf16/fp32); upcast to fp32 here, chunk by chunk where fused
    labels          (N,)    int64 target token ids (all valid: untrained positions are already removed)
    topk_ids        (N, k)  teacher top-k token ids, distinct within a row; -1 marks a padded slot
    topk_logprobs   (N, k)  float32 teacher log-probs, normalised over the full vocabulary; -inf where padded
    tail_logprob    (N,)    float32 log of the teacher mass outside the stored ids; -inf when they hold it all

Padded slots (id < 0) are ignored entirely, so a variable k per position can live in a fixed (N, k) tensor.

Every function returns a SUM over positions, never a mean. The training loop divides once per
optimiser step by the global number of trained positions (over micro-batches and ranks): a mean per
micro-batch would weight a position in a short micro-batch more than one in a long micro-batch, and
gradient accumulation would then no longer equal one big batch (TRL issue #4719). Sums make it exact.

Teacher-side categories. The stored teacher distribution is treated as categorical over the valid top-k
ids plus, for ``tail="bucket"``, one (k+1)-th "tail" category holding the rest of the mass. These k+1
log-probs are always re-normalised (a log-softmax over the categories): with consistent data this is a
no-op up to rounding, and with quantised storage it makes the teacher a proper distribution, so every
divergence here is >= 0.

Entry points:
- ``fused_ce_kl_sums``: the training path. CE and forward KL with their analytic gradients in one pass
  over chunks of positions; bounded memory.
- ``ce_sum``, ``topk_kl_sum``, ``topk_reverse_kl_sum``, ``topk_jsd_sum``: plain autograd versions
  (the reference the fused path is tested against; also the only path for reverse KL and JSD).
- ``exact_kl_sum``: full-vocabulary KL from (N, V) teacher log-probs (the online-teacher reference).
- ``loss_weights`` / ``total_loss_sum``: the CE + λ·KL combination ("add" or "mix").
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "LOG_PROB_FLOOR",
    "FusedLossSums",
    "ce_sum",
    "exact_kl_sum",
    "fused_ce_kl_sums",
    "loss_weights",
    "topk_jsd_sum",
    "topk_kl_sum",
    "topk_reverse_kl_sum",
    "total_loss_sum",
]

# log of the smallest normal fp32 number (≈ -87.34). A log-probability that would be -inf (a student
# with no tail category, a category the teacher gives zero mass in the reverse direction) is floored
# here so that a degenerate row costs a bounded ≤ 87·mass nats instead of inf/NaN. Below the floor the
# gradient through that log-probability is zero (torch.clamp semantics); both paths agree on this.
LOG_PROB_FLOOR = math.log(torch.finfo(torch.float32).tiny)

# Below this student tail mass the fused path recomputes the tail in log space: summing fp32
# probabilities is exact enough above it, but tail probabilities near fp32's normal range lose digits.
_TAIL_LINEAR_MIN = 1e-30

_TAILS = ("bucket", "renorm")
_LOSS_FORMS = ("add", "mix")


# ---------------------------------------------------------------------------------------------------
# validation


def _check_inputs(student_logits, topk_ids, topk_logprobs, tail_logprob, tail, kd_temperature, labels=None):
    problems = []
    if student_logits.dim() != 2:
        problems.append(f"student_logits must be (N, V), got shape {tuple(student_logits.shape)}")
    elif not student_logits.is_floating_point():
        problems.append(f"student_logits must be a float tensor, got {student_logits.dtype}")
    n = student_logits.shape[0] if student_logits.dim() == 2 else None
    if topk_ids.dim() != 2 or (n is not None and topk_ids.shape[0] != n):
        problems.append(f"topk_ids must be (N, k) with N={n}, got shape {tuple(topk_ids.shape)}")
    if topk_logprobs.shape != topk_ids.shape:
        problems.append(
            f"topk_logprobs must have the shape of topk_ids {tuple(topk_ids.shape)}, got {tuple(topk_logprobs.shape)}"
        )
    if tail_logprob.dim() != 1 or (n is not None and tail_logprob.shape[0] != n):
        problems.append(f"tail_logprob must be (N,) with N={n}, got shape {tuple(tail_logprob.shape)}")
    if labels is not None and (labels.dim() != 1 or (n is not None and labels.shape[0] != n)):
        problems.append(f"labels must be (N,) with N={n}, got shape {tuple(labels.shape)}")
    if tail not in _TAILS:
        problems.append(f"tail={tail!r} is not one of {_TAILS}")
    if not (isinstance(kd_temperature, (int, float)) and math.isfinite(kd_temperature) and kd_temperature > 0):
        problems.append(f"kd_temperature={kd_temperature!r} must be a finite number > 0 (1.0 = no temperature)")
    if problems:
        raise ValueError("invalid loss inputs:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------------------------------------------
# categorical views of the teacher and the student


def _valid_and_safe_ids(topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid (N, k) bool, ids (N, k) int64 with padded slots pointed at id 0 so gather never fails)."""
    ids = topk_ids.long()
    valid = ids >= 0
    return valid, ids.clamp(min=0)


def _in_topk_mask(ids: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, V) bool, True at the valid top-k ids of each row."""
    # Padded slots scatter into a spare column V that is dropped: pointing them at a real id could
    # overwrite that id's True (scatter order with duplicates is undefined).
    n = ids.shape[0]
    mask = torch.zeros(n, vocab_size + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(1, torch.where(valid, ids, vocab_size), True)
    return mask[:, :vocab_size]


def _teacher_logprobs(topk_logprobs, tail_logprob, valid, tail, kd_temperature):
    """Teacher categorical log-probs A (N, M) and has_mass (N,) bool; M = k+1 (bucket) or k (renorm).

    A = log_softmax(a / τ) over the categories, a = (t_1..t_k[, log p_T]); padded slots are -inf.
    With τ ≠ 1 this tempers the k+1 buckets, which is an approximation: the teacher's distribution
    *inside* the tail is unknown, so the tail is tempered as if it were one token (exact for τ = 1).
    Rows with no teacher mass at all (every slot padded, tail -inf) get has_mass False and contribute 0.
    """
    t = topk_logprobs.float().masked_fill(~valid, float("-inf"))  # (N, k)
    a = torch.cat([t, tail_logprob.float()[:, None]], dim=1) if tail == "bucket" else t  # (N, M)
    has_mass = (a > float("-inf")).any(dim=1)  # (N,)
    # A row of only -inf would give NaN; any finite stand-in works because the row is masked out.
    a = torch.where(has_mass[:, None], a, 0.0)
    if kd_temperature != 1.0:
        a = a / kd_temperature
    return torch.log_softmax(a, dim=1), has_mass


def _renorm_logprobs(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log_softmax of x (N, k) over the valid slots only; padded slots get a finite 0 (never used)."""
    any_valid = valid.any(dim=1, keepdim=True)  # (N, 1)
    x = torch.where(any_valid, x.masked_fill(~valid, float("-inf")), 0.0)
    # Finite garbage instead of -inf keeps 0·(-inf) out of the backward pass; callers mask these slots.
    return torch.where(valid, torch.log_softmax(x, dim=1), 0.0)


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
        return _renorm_logprobs(z.gather(1, ids), valid), valid
    s = torch.log_softmax(z, dim=1)  # (N, V)
    s_topk = s.gather(1, ids)  # (N, k)
    in_topk = _in_topk_mask(ids, valid, s.shape[1])  # (N, V)
    has_tail = ~in_topk.all(dim=1)  # (N,)
    # Rows without tail ids would logsumexp over only -inf (NaN gradient): give them finite input.
    s_tail = torch.where(has_tail[:, None], s.masked_fill(in_topk, float("-inf")), 0.0)  # (N, V)
    log_q_tail = torch.where(has_tail, torch.logsumexp(s_tail, dim=1), LOG_PROB_FLOOR)  # (N,)
    log_q_tail = log_q_tail.clamp(min=LOG_PROB_FLOOR)
    b = torch.cat([s_topk, log_q_tail[:, None]], dim=1)  # (N, k+1)
    return b, torch.cat([valid, has_tail[:, None]], dim=1)


# ---------------------------------------------------------------------------------------------------
# divergences between the categorical views; A may hold -inf, B is finite, B_exists marks real categories


def _forward_kl_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) Σ_c P_c (A_c − B_c), P = exp(A); a category with P = 0 contributes exactly 0."""
    p = a.exp()
    present = p > 0
    # where() on the *inputs* as well: 0·(-inf) in an unselected branch would still poison the gradient.
    return torch.where(present, p * (torch.where(present, a, 0.0) - b), 0.0).sum(dim=1)


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
    _check_inputs(student_logits, topk_ids, topk_logprobs, tail_logprob, tail, kd_temperature)
    valid, ids = _valid_and_safe_ids(topk_ids)
    a, has_mass = _teacher_logprobs(topk_logprobs, tail_logprob, valid, tail, kd_temperature)  # (N, M)
    b, b_exists = _student_logprobs(student_logits, ids, valid, tail, kd_temperature)  # (N, M)
    if divergence == "forward":
        rows = _forward_kl_rows(a, b)
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
    return _forward_kl_rows(teacher_logprobs_full.float(), s).sum()


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


def total_loss_sum(ce_sum: torch.Tensor, kl_sum: torch.Tensor, kl_weight: float, loss_form: str = "add") -> torch.Tensor:
    """CE + λ·KL ("add") or (1 − λ)·CE + λ·KL ("mix") of two summed losses (scalars)."""
    w_ce, w_kl = loss_weights(kl_weight, loss_form)
    return w_ce * ce_sum + w_kl * kl_sum


# ---------------------------------------------------------------------------------------------------
# public: the fused, chunked CE + forward KL


class FusedLossSums(NamedTuple):
    """Only ``total`` carries a gradient (of ce_weight·CE + kl_weight·KL); ce and kl are for logging."""

    total: torch.Tensor  # float32 scalar
    ce: torch.Tensor  # float32 scalar, detached
    kl: torch.Tensor  # float32 scalar, detached


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over dim 1, in place on x (C, V)."""
    # Shift by the max first, as torch.log_softmax does: subtracting a logsumexp of ~1e4 directly would
    # round every log-prob to fp32's ulp at 1e4 (≈ 1e-3).
    x.sub_(x.amax(dim=1, keepdim=True))
    return x.sub_(torch.logsumexp(x, dim=1, keepdim=True))


def _fused_chunk(z_in, labels, ids, valid, topk_logprobs, tail_logprob, w_ce, w_kl, tail, tau, need_grad,
                 owned=False):
    """CE rows (C,), KL rows (C,) and, if need_grad, d(w_ce·CE + w_kl·KL)/dz (C, V) fp32 for one chunk.

    Gradients (q = softmax(z/τ), P the normalised teacher categories, C = chunk rows):
      CE:            p_j − [j = y],                              p = softmax(z)
      bucket KL:     τ·( q_j·(P_S + u·P_T) − [j∈S]·P_j − u·P_T·[j∉S]·q_j/q_T )
                     P_S = Σ_{i∈S} P_i; u = 0 where log q_T sits on the floor (clamp), else 1
      renorm KL:     τ·[j∈S]·( q̃_j·Σ_S P̃ − P̃_j ),             q̃ = softmax over S of z_S/τ
    (the KL factor τ = τ² · 1/τ: Hinton's τ² times d(z/τ)/dz).
    """
    # (C, V): the one fp32 copy of the chunk, modified in place below; a caller's own fp32 scratch
    # (owned=True: the fused head's freshly computed logits) is used as it is.
    z = z_in if owned and z_in.dtype == torch.float32 else z_in.to(torch.float32, copy=True)
    a, has_mass = _teacher_logprobs(topk_logprobs, tail_logprob, valid, tail, tau)  # (C, M)
    p = torch.where(has_mass[:, None], a.exp(), 0.0)  # (C, M)
    k = ids.shape[1]

    if tail == "renorm":
        z_topk = z.gather(1, ids)  # (C, k)
        if tau != 1.0:
            z_topk = z_topk / tau
        b = _renorm_logprobs(z_topk, valid)  # (C, k)
        kl_rows = _forward_kl_rows(a, b)
        ce_rows = -_log_softmax_(z).gather(1, labels[:, None]).squeeze(1)  # (C,)
        grad = None
        if need_grad:
            grad = z.exp_()  # (C, V) softmax(z), in place
            grad.mul_(w_ce)
            grad.scatter_add_(1, labels[:, None], grad.new_full((labels.shape[0], 1), -w_ce))
            q_renorm = torch.where(valid, b.exp(), 0.0)  # (C, k)
            kl_grad = (w_kl * tau) * (q_renorm * p.sum(dim=1, keepdim=True) - p)  # (C, k); 0 where padded
            grad.scatter_add_(1, ids, kl_grad)
        return ce_rows, torch.where(has_mass, kl_rows, 0.0) * tau**2, grad

    # bucket
    grad = None
    s = _log_softmax_(z)  # (C, V) log_softmax(z), in place
    ce_rows = -s.gather(1, labels[:, None]).squeeze(1)  # (C,)
    if tau != 1.0:
        if need_grad:
            grad = s.exp()  # (C, V) softmax(z) for the CE part
            grad.mul_(w_ce)
            grad.scatter_add_(1, labels[:, None], grad.new_full((labels.shape[0], 1), -w_ce))
        # log_softmax is shift-invariant, so tempering log_softmax(z) equals tempering z.
        s = _log_softmax_(s.div_(tau))  # (C, V) log_softmax(z/τ), in place
    q = s.exp()  # (C, V)
    in_topk = _in_topk_mask(ids, valid, s.shape[1])  # (C, V)
    has_tail = ~in_topk.all(dim=1)  # (C,)
    # Summing tail probabilities (no cancellation, unlike 1 − q_S) is exact to fp32 rounding.
    ratio = q.masked_fill(in_topk, 0.0)  # (C, V): q_j on the tail, becomes q_j / q_T below
    q_tail = ratio.sum(dim=1)  # (C,)
    linear = q_tail >= _TAIL_LINEAR_MIN
    log_q_tail = torch.where(linear, torch.log(torch.where(linear, q_tail, 1.0)), float("-inf"))
    ratio.div_(torch.where(linear, q_tail, 1.0)[:, None])
    rare = (~linear & has_tail).nonzero().squeeze(1)  # tiny tails: redo in log space (rows with no tail stay 0)
    if rare.numel():
        s_rare = s[rare].masked_fill(in_topk[rare], float("-inf"))  # (R, V)
        lse_rare = torch.logsumexp(s_rare, dim=1)  # (R,)
        log_q_tail[rare] = lse_rare
        ratio[rare] = torch.exp(s_rare - lse_rare[:, None]).nan_to_num_(0.0)  # -inf − -inf rows → 0
    on_floor = ~(has_tail & (log_q_tail >= LOG_PROB_FLOOR))  # (C,) clamp active: zero gradient via q_T
    log_q_tail = torch.where(has_tail, log_q_tail, LOG_PROB_FLOOR).clamp(min=LOG_PROB_FLOOR)

    b = torch.cat([s.gather(1, ids), log_q_tail[:, None]], dim=1)  # (C, k+1)
    kl_rows = _forward_kl_rows(a, b)

    if need_grad:
        p_topk, p_tail = p[:, :k], torch.where(on_floor, 0.0, p[:, k])  # (C, k), (C,)
        coef = (w_kl * tau) * (p_topk.sum(dim=1) + p_tail)  # (C,)
        if grad is None:  # τ = 1: CE and KL share softmax(z); reuse q's storage
            grad = q.mul_((w_ce + coef)[:, None])
            grad.scatter_add_(1, labels[:, None], grad.new_full((labels.shape[0], 1), -w_ce))
        else:
            grad.add_(q.mul_(coef[:, None]))
        grad.scatter_add_(1, ids, (-w_kl * tau) * p_topk)
        grad.addcmul_(ratio, ((-w_kl * tau) * p_tail)[:, None])
    return ce_rows, torch.where(has_mass, kl_rows, 0.0) * tau**2, grad


def _weighted_sums(ctx, ce_total, kl_total, w_ce, w_kl):
    """(total, ce, kl) fp32 scalars from fp64 running sums; only total is differentiable."""
    ce_total, kl_total = ce_total.float(), kl_total.float()
    total = (w_ce * ce_total.double() + w_kl * kl_total.double()).float()
    ctx.mark_non_differentiable(ce_total, kl_total)
    return total, ce_total, kl_total


class _FusedCEKL(torch.autograd.Function):
    """Forward computes the values and the analytic gradient chunk by chunk; backward only scales it."""

    @staticmethod
    def forward(ctx, logits, labels, topk_ids, topk_logprobs, tail_logprob, w_ce, w_kl, tail, tau, chunk_size, need_grad):
        n = logits.shape[0]
        valid, ids = _valid_and_safe_ids(topk_ids)
        labels = labels.long()
        # The stored gradient is (N, V) in the logits' dtype: no more than the fp32 log-softmax that
        # autograd keeps for a plain CE, and half of it in bf16.
        grad = torch.empty_like(logits) if need_grad else None
        ce_total = torch.zeros((), dtype=torch.float64, device=logits.device)
        kl_total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for start in range(0, n, chunk_size):
            sl = slice(start, min(start + chunk_size, n))
            ce_rows, kl_rows, g = _fused_chunk(
                logits[sl], labels[sl], ids[sl], valid[sl], topk_logprobs[sl], tail_logprob[sl],
                w_ce, w_kl, tail, tau, need_grad,
            )  # fmt: skip
            ce_total += ce_rows.sum(dtype=torch.float64)
            kl_total += kl_rows.sum(dtype=torch.float64)
            if need_grad:
                grad[sl].copy_(g)
        ctx.stored_grad = grad
        return _weighted_sums(ctx, ce_total, kl_total, w_ce, w_kl)

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kl):
        grad = ctx.stored_grad
        if grad is None:
            raise RuntimeError(
                "fused_ce_kl_sums: backward ran twice (or without a stored gradient). The fused loss frees "
                "its (N, V) gradient after the first backward, so retain_graph=True is not supported; "
                "recompute the loss instead."
            )
        ctx.stored_grad = None
        # In place: the stored buffer is ours alone, and a second (N, V) buffer is what we avoid.
        return grad.mul_(grad_total.to(grad.dtype)), None, None, None, None, None, None, None, None, None, None


def fused_ce_kl_sums(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    *,
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    tail: str = "bucket",
    kd_temperature: float = 1.0,
    chunk_size: int = 1024,
) -> FusedLossSums:
    """ce_weight·CE + kl_weight·KL(teacher‖student) summed over positions, in one chunked pass.

    Inputs as ``ce_sum`` and ``topk_kl_sum``: student_logits (N, V) bf16/fp32, labels (N,),
    topk_ids / topk_logprobs (N, k), tail_logprob (N,). Same values as
    ``total_loss_sum(ce_sum(...), topk_kl_sum(...))`` (take the weights from ``loss_weights``) and the
    same gradient, but memory-bounded: positions are processed ``chunk_size`` at a time, only that chunk
    is upcast to fp32, and the analytic gradient w.r.t. the logits is written into one (N, V) buffer in
    the logits' dtype. Peak extra memory ≈ (N·V in the logits' dtype) + 4–5 × chunk_size·V fp32.
    A plain autograd CE keeps an (N, V) fp32 log-softmax, so this never needs more than plain CE.

    Returns FusedLossSums(total, ce, kl): call ``.backward()`` on ``total`` only (ce and kl are detached
    copies for logging). backward can run once per call (the gradient buffer is then released).
    Forward KL only; reverse KL and JSD are in the autograd functions. N = 0 gives zeros.
    """
    _check_inputs(student_logits, topk_ids, topk_logprobs, tail_logprob, tail, kd_temperature, labels=labels)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be an int >= 1 (positions per chunk)")
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    total, ce, kl = _FusedCEKL.apply(
        student_logits, labels, topk_ids, topk_logprobs, tail_logprob,
        float(ce_weight), float(kl_weight), tail, float(kd_temperature), chunk_size, need_grad,
    )  # fmt: skip
    return FusedLossSums(total, ce, kl)
