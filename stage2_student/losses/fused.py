"""The training path: CE + λ·KL(teacher‖student) with analytic gradients, chunk by chunk, in two forms.

``fused_ce_kl_sums(logits, ...)``: from the (N, V) logits of the trained positions. CE and forward KL
with their analytic gradients in one pass over chunks of positions; bounded memory beyond the logits.

``fused_head_ce_kl_sums(hidden, weight, ...)``: from the final hidden states, the lm_head applied chunk by
chunk inside the loss (`stage2_student.lm_head_bypass` decides when a model allows it).

`fused_ce_kl_sums` bounds the loss's own memory, but its input, the (N, V) logits of the trained
positions, still exists in full (and the HF forward keeps (B, T, V) of them). At a 49k–128k vocabulary
that tensor is the largest activation of a fine-tuning step. `fused_head_ce_kl_sums` keeps the logits of
`chunk_size` positions at a time: z = h W^T (+ b) for the chunk, then its values and its analytic gradient
g = dL/dz (`_fused_chunk`, the same arithmetic as `fused_ce_kl_sums`), then dL/dh = g W and
dL/dW += g^T h, then the chunk's logits are dropped. The matmuls are the ones autograd would run
(one forward, two backward), so the time is that of the logits path; the peak memory is
O(C·V) + one (V, H) gradient instead of O(N·V), with C = `head_chunk_rows(N, chunk_size)`.

The lm_head's dtype follows the caller's autocast, as `nn.Linear` would: under autocast the matmuls
run in the autocast dtype, otherwise in the promoted dtype of h and W; the loss arithmetic is fp32.
Forward KL only; reverse KL and JSD are in `reference`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .categories import (
    LOG_PROB_FLOOR,
    check_inputs,
    forward_kl_rows,
    in_topk_mask,
    renorm_logprobs,
    teacher_logprobs,
    valid_and_safe_ids,
)

__all__ = ["FusedLossSums", "fused_ce_kl_sums", "fused_head_ce_kl_sums", "head_chunk_rows"]

# Below this student tail mass the fused path recomputes the tail in log space: summing fp32
# probabilities is exact enough above it, but tail probabilities near fp32's normal range lose digits.
_TAIL_LINEAR_MIN = 1e-30


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


def _fused_chunk(z_in, labels, ids, valid, topk_logprobs, tail_logprob, w_ce, w_kl, tail, tau, need_grad, owned=False):
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
    a, has_mass = teacher_logprobs(topk_logprobs, tail_logprob, valid, tail, tau)  # (C, M)
    p = torch.where(has_mass[:, None], a.exp(), 0.0)  # (C, M)
    k = ids.shape[1]

    if tail == "renorm":
        z_topk = z.gather(1, ids)  # (C, k)
        if tau != 1.0:
            z_topk = z_topk / tau
        b = renorm_logprobs(z_topk, valid)  # (C, k)
        kl_rows = forward_kl_rows(a, b)
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
    in_topk = in_topk_mask(ids, valid, s.shape[1])  # (C, V)
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
    kl_rows = forward_kl_rows(a, b)

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
    def forward(
        ctx, logits, labels, topk_ids, topk_logprobs, tail_logprob, w_ce, w_kl, tail, tau, chunk_size, need_grad
    ):
        n = logits.shape[0]
        valid, ids = valid_and_safe_ids(topk_ids)
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
    check_inputs(student_logits, topk_ids, topk_logprobs, tail_logprob, tail, kd_temperature, labels=labels)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be an int >= 1 (positions per chunk)")
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    total, ce, kl = _FusedCEKL.apply(
        student_logits, labels, topk_ids, topk_logprobs, tail_logprob,
        float(ce_weight), float(kl_weight), tail, float(kd_temperature), chunk_size, need_grad,
    )  # fmt: skip
    return FusedLossSums(total, ce, kl)


# ---------------------------------------------------------------------------------------------------
# the lm_head inside the loss


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def head_chunk_rows(n: int, chunk_size: int) -> int:
    """Positions per chunk: at most an eighth of them, so the chunk's few fp32 (C, V) buffers stay below
    the (N, V) logits they replace even for a small batch; at least 16, so that the per-chunk overhead
    (a dozen kernels) stays small; at most chunk_size."""
    return max(1, min(chunk_size, max(16, -(-n // 8))))


class _FusedHeadCEKL(torch.autograd.Function):
    """Forward computes the values and the gradients w.r.t. h, W (and b) chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, topk_ids, topk_logprobs, tail_logprob,
                w_ce, w_kl, tail, tau, chunk_size):  # fmt: skip
        dev = hidden.device.type
        cdt = _compute_dtype(hidden, weight)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        need_grad = want_h or want_w or want_b
        valid, ids = valid_and_safe_ids(topk_ids)
        labels = labels.long()
        n = hidden.shape[0]
        chunk_size = head_chunk_rows(n, chunk_size)
        with torch.autocast(dev, enabled=False):
            w = weight.to(cdt)  # under autocast nn.Linear makes the same cast (and caches it)
            b = bias.to(cdt) if bias is not None else None
            grad_h = torch.empty_like(hidden) if want_h else None
            # fp32 accumulation over chunks, as a matmul accumulates internally; stored in W's dtype.
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
            ce_total = torch.zeros((), dtype=torch.float64, device=hidden.device)
            kl_total = torch.zeros((), dtype=torch.float64, device=hidden.device)
            for start in range(0, n, chunk_size):
                sl = slice(start, min(start + chunk_size, n))
                h = hidden[sl].to(cdt)  # (C, H)
                z = h @ w.t() if b is None else torch.addmm(b, h, w.t())  # (C, V)
                ce_rows, kl_rows, g = _fused_chunk(
                    z,
                    labels[sl],
                    ids[sl],
                    valid[sl],
                    topk_logprobs[sl],
                    tail_logprob[sl],
                    w_ce,
                    w_kl,
                    tail,
                    tau,
                    need_grad,
                    owned=True,
                )
                del z
                ce_total += ce_rows.sum(dtype=torch.float64)
                kl_total += kl_rows.sum(dtype=torch.float64)
                if need_grad:
                    if want_b:
                        grad_b += g.sum(dim=0)
                    g = g.to(cdt)
                    if want_h:
                        grad_h[sl] = g @ w
                    if want_w:
                        if cdt == torch.float32:
                            grad_w.addmm_(g.t(), h)
                        else:  # the bf16/fp16 product, summed over chunks in fp32
                            grad_w.add_(g.t() @ h)
                    del g
        ctx.grads = (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        return _weighted_sums(ctx, ce_total, kl_total, w_ce, w_kl)

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kl):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_head_ce_kl_sums: backward ran twice; retain_graph=True is not supported "
                "(the gradients are computed in the forward and freed by the first backward)"
            )
        grads, ctx.grads = ctx.grads, None
        out = [None if t is None else t.mul_(grad_total.to(t.dtype)) for t in grads]
        return (*out, None, None, None, None, None, None, None, None, None)


def fused_head_ce_kl_sums(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    tail: str = "bucket",
    kd_temperature: float = 1.0,
    chunk_size: int = 1024,
) -> FusedLossSums:
    """``fused_ce_kl_sums(hidden @ weight.T + bias, ...)`` without the (N, V) logits.

    hidden (N, H) final hidden states of the trained positions (after the model's last norm), weight (V, H)
    the lm_head (or tied embedding) matrix, bias (V,) or None; the other inputs as ``fused_ce_kl_sums``.
    Same values and gradients (w.r.t. hidden, weight and bias) as that function applied to the logits.
    Returns FusedLossSums(total, ce, kl); backward once, on ``total``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (N, H) and weight (V, H) with the same H; got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    # Shape checks against a (N, V) stand-in: no memory, the same messages as the logits path.
    check_inputs(
        hidden.new_empty(1, 1).expand(hidden.shape[0], weight.shape[0]),
        topk_ids,
        topk_logprobs,
        tail_logprob,
        tail,
        kd_temperature,
        labels=labels,
    )
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be an int >= 1 (positions per chunk)")
    total, ce, kl = _FusedHeadCEKL.apply(
        hidden,
        weight,
        bias,
        labels,
        topk_ids,
        topk_logprobs,
        tail_logprob,
        float(ce_weight),
        float(kl_weight),
        tail,
        float(kd_temperature),
        chunk_size,
    )
    return FusedLossSums(total, ce, kl)
