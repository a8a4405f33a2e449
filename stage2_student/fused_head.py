"""CE + λ·KL straight from the final hidden states: the lm_head applied chunk by chunk inside the loss.

`fused_ce_kl_sums` bounds the loss's own memory, but its input, the (N, V) logits of the trained
positions, still exists in full (and the HF forward keeps (B, T, V) of them). At a 49k–128k vocabulary
that tensor is the largest activation of a fine-tuning step. Here the logits of `chunk_size` positions
exist at a time: z = h W^T (+ b) for the chunk, then its values and its analytic gradient g = dL/dz
(`losses._fused_chunk`, the same arithmetic as `fused_ce_kl_sums`), then dL/dh = g W and
dL/dW += g^T h, then the chunk's logits are dropped. The matmuls are the ones autograd would run
(one forward, two backward), so the time is that of the logits path; the peak memory is
O(C·V) + one (V, H) gradient instead of O(N·V), with C = `head_chunk_rows(N, chunk_size)`.

The lm_head's dtype follows the caller's autocast, as `nn.Linear` would: under autocast the matmuls
run in the autocast dtype, otherwise in the promoted dtype of h and W; the loss arithmetic is fp32.
"""
from __future__ import annotations

import torch

from .losses import FusedLossSums, _check_inputs, _fused_chunk, _valid_and_safe_ids, _weighted_sums


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
        valid, ids = _valid_and_safe_ids(topk_ids)
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
                ce_rows, kl_rows, g = _fused_chunk(z, labels[sl], ids[sl], valid[sl], topk_logprobs[sl],
                                                   tail_logprob[sl], w_ce, w_kl, tail, tau, need_grad, owned=True)
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
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                     None if grad_b is None else grad_b.to(bias.dtype))
        return _weighted_sums(ctx, ce_total, kl_total, w_ce, w_kl)

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kl):
        if ctx.grads is None:
            raise RuntimeError("fused_head_ce_kl_sums: backward ran twice; retain_graph=True is not supported "
                               "(the gradients are computed in the forward and freed by the first backward)")
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
        raise ValueError(f"hidden must be (N, H) and weight (V, H) with the same H; got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    # Shape checks against a (N, V) stand-in: no memory, the same messages as the logits path.
    _check_inputs(hidden.new_empty(1, 1).expand(hidden.shape[0], weight.shape[0]), topk_ids, topk_logprobs,
                  tail_logprob, tail, kd_temperature, labels=labels)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be an int >= 1 (positions per chunk)")
    total, ce, kl = _FusedHeadCEKL.apply(hidden, weight, bias, labels, topk_ids, topk_logprobs, tail_logprob,
                                         float(ce_weight), float(kl_weight), tail, float(kd_temperature), chunk_size)
    return FusedLossSums(total, ce, kl)
