"""The teacher's stored labels and the student's logits as categorical distributions: what both loss paths
(`reference`, the autograd one, and `fused`, the analytic-gradient one) share.

Teacher-side categories. The stored teacher distribution is treated as categorical over the valid top-k
ids plus, for ``tail="bucket"``, one (k+1)-th "tail" category holding the rest of the mass. These k+1
log-probs are always re-normalised (a log-softmax over the categories): with consistent data this is a
no-op up to rounding, and with quantised storage it makes the teacher a proper distribution, so every
divergence here is >= 0.

Inputs are flattened to the N trained positions of a micro-batch (see the package docstring); a topk_ids
slot < 0 is padding and is ignored entirely.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "LOG_PROB_FLOOR",
    "TAILS",
    "check_inputs",
    "forward_kl_rows",
    "in_topk_mask",
    "renorm_logprobs",
    "teacher_logprobs",
    "valid_and_safe_ids",
]

# log of the smallest normal fp32 number (≈ -87.34). A log-probability that would be -inf (a student
# with no tail category, a category the teacher gives zero mass in the reverse direction) is floored
# here so that a degenerate row costs a bounded ≤ 87·mass nats instead of inf/NaN. Below the floor the
# gradient through that log-probability is zero (torch.clamp semantics); both paths agree on this.
LOG_PROB_FLOOR = math.log(torch.finfo(torch.float32).tiny)

TAILS = ("bucket", "renorm")


# ---------------------------------------------------------------------------------------------------
# validation


def check_inputs(student_logits, topk_ids, topk_logprobs, tail_logprob, tail, kd_temperature, labels=None):
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
    if tail not in TAILS:
        problems.append(f"tail={tail!r} is not one of {TAILS}")
    if not (isinstance(kd_temperature, (int, float)) and math.isfinite(kd_temperature) and kd_temperature > 0):
        problems.append(f"kd_temperature={kd_temperature!r} must be a finite number > 0 (1.0 = no temperature)")
    if problems:
        raise ValueError("invalid loss inputs:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------------------------------------------
# categorical views of the teacher and the student


def valid_and_safe_ids(topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid (N, k) bool, ids (N, k) int64 with padded slots pointed at id 0 so gather never fails)."""
    ids = topk_ids.long()
    valid = ids >= 0
    return valid, ids.clamp(min=0)


def in_topk_mask(ids: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, V) bool, True at the valid top-k ids of each row."""
    # Padded slots scatter into a spare column V that is dropped: pointing them at a real id could
    # overwrite that id's True (scatter order with duplicates is undefined).
    n = ids.shape[0]
    mask = torch.zeros(n, vocab_size + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(1, torch.where(valid, ids, vocab_size), True)
    return mask[:, :vocab_size]


def teacher_logprobs(topk_logprobs, tail_logprob, valid, tail, kd_temperature):
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


def renorm_logprobs(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log_softmax of x (N, k) over the valid slots only; padded slots get a finite 0 (never used)."""
    any_valid = valid.any(dim=1, keepdim=True)  # (N, 1)
    x = torch.where(any_valid, x.masked_fill(~valid, float("-inf")), 0.0)
    # Finite garbage instead of -inf keeps 0·(-inf) out of the backward pass; callers mask these slots.
    return torch.where(valid, torch.log_softmax(x, dim=1), 0.0)


# ---------------------------------------------------------------------------------------------------
# the forward KL between two categorical views (both loss paths); A may hold -inf, B is finite


def forward_kl_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) Σ_c P_c (A_c − B_c), P = exp(A); a category with P = 0 contributes exactly 0."""
    p = a.exp()
    present = p > 0
    # where() on the *inputs* as well: 0·(-inf) in an unselected branch would still poison the gradient.
    return torch.where(present, p * (torch.where(present, a, 0.0) - b), 0.0).sum(dim=1)
