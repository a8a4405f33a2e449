"""Final hidden states -> what a capture mode stores: the lm_head, the fp32 softmax / log-softmax, top-k, tails and
inverse-CDF draws, chunk by chunk. Shared by the transformers engine and the vLLM engine's hidden-state route, so
both draw with the same function from the same uniforms (storage.capture.DRAWS_ALGORITHM).

At most `chunk_positions` x vocab fp32 values exist at a time (never batch x T x vocab): the head runs in the
engine's dtype on a chunk of positions, the softmax / log-sum-exp in fp32.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

# Where the top k hold less than 1 - _TAIL_DIRECT_MIN of the mass, the tail is log(1 - Σ p_topk) (fp64 sum
# of fp32 log-probs: absolute error ~2.5e-7, so ~5e-6 in log space at this threshold). Above it the
# subtraction cancels, and those rows sum the rest of the distribution instead.
_TAIL_DIRECT_MIN = 0.05


def topk_and_tail(lp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k log-probs (C, k) descending, their ids (C, k), tail log-prob (C,)) of log-probs lp (C, V).

    One top-k pass and a k-term sum per row; only peaked rows (top-k mass > 1 - _TAIL_DIRECT_MIN) pay a
    second pass over the vocabulary. lp is modified (those rows' top-k set to -inf)."""
    vals, idx = torch.topk(lp, k, dim=-1, sorted=True)
    rest = -torch.expm1(torch.logsumexp(vals.double(), dim=-1))  # (C,) 1 - Σ p_topk, fp64
    tail = torch.log(rest.clamp(min=0.0)).float()
    peaked = (rest < _TAIL_DIRECT_MIN).nonzero().squeeze(1)
    if peaked.numel():
        sub = lp[peaked].scatter_(-1, idx[peaked], float("-inf"))
        tail[peaked] = torch.logsumexp(sub, dim=-1)
    return vals, idx, tail


# Draws read the vocabulary in blocks of _DRAW_BLOCK ids: one pass sums each block (fp32), a draw picks its
# block from the (C, V / _DRAW_BLOCK) fp64 cumulative block sums, then its id from that block's fp64 cumsum.
# So the only vocabulary-sized work after the softmax is one summing pass in fp32: no (C, V) fp64 cumsum
# (twice the memory of the logits). 128 keeps the per-draw gather (C, N, 128) small at 256k vocabularies.
_DRAW_BLOCK = 128


# A chunk's vocabulary-sized fp32 buffers stay under this many bytes each: 1024 positions up to 64k ids,
# 512 at 128k, 256 at 256k (Gemma's 262k), so a large vocabulary does not multiply the peak memory.
_CHUNK_BYTES = 256 * 2**20


def default_chunk_positions(vocab_size: int) -> int:
    return max(1, min(1024, _CHUNK_BYTES // (4 * vocab_size)))


def _block_sums(p: torch.Tensor, block: int) -> torch.Tensor:
    """(C, V) -> (C, ceil(V / block)) fp32 sums of consecutive blocks, without copying p."""
    C, V = p.shape
    full = V // block
    parts = []
    if full:
        parts.append(p[:, : full * block].reshape(C, full, block).sum(-1))  # a view: rows are contiguous
    if V % block:
        parts.append(p[:, full * block :].sum(-1, keepdim=True))
    return torch.cat(parts, dim=1)


def inverse_cdf_draws(p: torch.Tensor, u: torch.Tensor, block: int = _DRAW_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw per uniform u (C, N) in (0, 1] from the unnormalised distribution p (C, V) >= 0: the first id
    whose cumulative mass reaches u · total, found block by block (see _DRAW_BLOCK). Returns ids (C, N)
    int64 (-1 where the row is all zero) and the row totals (C,) fp64.

    A draw picks block j with probability S_j / Σ S (S: fp32 block sums) and then id i in the block with
    probability p_i / Σ_block p (fp64 cumsum of the block): the inverse CDF of p up to the fp32 rounding of
    the block sums (~1e-7 relative), far below anything a stored label can show."""
    C, V = p.shape
    sums = _block_sums(p, block).double()  # (C, nb)
    cdf = torch.cumsum(sums, dim=-1)
    total = cdf[:, -1]  # (C,)
    target = u.double() * total[:, None]  # (C, N)
    j = torch.searchsorted(cdf, target).clamp_(max=cdf.shape[1] - 1)  # (C, N): the block of each draw
    s_j = sums.gather(1, j)
    frac = ((target - (cdf.gather(1, j) - s_j)) / s_j).clamp_(0.0, 1.0)  # share of block j's mass to reach
    start = j * block
    cols = start[..., None] + torch.arange(block, device=p.device)  # (C, N, block)
    vals = p.gather(1, cols.clamp(max=V - 1).view(C, -1)).view(cols.shape)
    if V % block:  # the last block is partial: its clamped columns repeat id V - 1
        vals = vals.masked_fill(cols >= V, 0.0)
    within = torch.cumsum(vals, dim=-1, dtype=torch.float64)  # (C, N, block)
    w = torch.searchsorted(within, (frac * within[..., -1])[..., None]).squeeze(-1).clamp_(max=block - 1)
    # Rounding can land a draw on an id without mass (past the block's last positive entry): take that entry.
    empty = vals.gather(-1, w[..., None]).squeeze(-1) <= 0
    if bool(empty.any()):
        last = block - 1 - torch.argmax((vals.flip(-1) > 0).to(torch.int8), dim=-1)
        w = torch.where(empty, last, w)
    ids = torch.where(total[:, None] > 0, start + w, torch.full_like(start, -1))
    return ids, total


def sampled_chunk(p: torch.Tensor, head_k: int, u: torch.Tensor, tail_only: bool):
    """The sampled modes' work on one chunk of probabilities p (C, V) fp32 (the softmax of the logits, which
    it may overwrite): draws (one per uniform) from the full distribution, or from the tail outside the top
    `head_k` when `tail_only`; plus the head (top `head_k` ids and log-probs, when head_k > 0) and the tail's
    log-mass (outside the head).
    Returns head log-probs (C, head_k), head ids, tail (C,), draw ids (C, N) int32, draw log-probs (C, N).

    After the softmax, the only vocabulary-sized work is the draws' block pass: no log-softmax copy, no
    fp64 (C, V) buffer, no second pass for the tail."""
    if head_k:
        vals, idx = torch.topk(p, head_k, dim=-1, sorted=True)
        head_lp = torch.log(vals)
    else:
        idx = torch.empty((p.shape[0], 0), dtype=torch.long, device=p.device)
        head_lp = torch.empty((p.shape[0], 0), dtype=torch.float32, device=p.device)
    if tail_only and head_k:
        p.scatter_(-1, idx, 0.0)
    ids, total = inverse_cdf_draws(p, u)
    # a drawn id has p > 0, so its log-prob is finite; fp32 p carries ~1e-7 relative error, as log_softmax does
    draw_lp = torch.where(ids >= 0, torch.log(p.gather(-1, ids.clamp(min=0))), torch.full_like(u, float("-inf")))
    if tail_only or not head_k:
        tail = torch.log(total).float() if head_k else torch.zeros_like(total, dtype=torch.float32)
    else:  # draws from the full distribution and a head: the mass outside the head needs its own pass
        tail = torch.log(p.scatter_(-1, idx, 0.0).sum(-1, dtype=torch.float32)).float()
    return head_lp, idx, tail, ids.to(torch.int32), draw_lp.float()


def score_positions(
    flat: torch.Tensor,
    k: int,
    *,
    project: Callable[[torch.Tensor], torch.Tensor] | None,
    chunk_positions: int,
    uniforms: torch.Tensor | None = None,
    tail_only: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Score n positions: `flat` (n, H) final hidden states with `project` the head (hidden -> logits), or
    (n, V) logits with project None. Chunk by chunk of `chunk_positions`:
    - without uniforms: top-k log-probs, ids and the tail (log-mass outside the top k);
    - with uniforms (n, N) in (0, 1]: one inverse-CDF draw per uniform from the full distribution (or, when
      `tail_only`, from outside the top k), their log-probs, and the head of k (k may be 0).
    Returns numpy (ids (n, k) int32, log-probs (n, k) fp32, tail (n,) fp32, draw ids (n, N) int32 or None,
    draw log-probs (n, N) fp32 or None)."""
    n = flat.shape[0]
    device = flat.device
    if uniforms is not None:
        if uniforms.shape[0] != n:
            raise ValueError(f"uniforms cover {uniforms.shape[0]} positions, the batch has {n}")
        draw_ids = torch.empty(uniforms.shape, dtype=torch.int32, device=device)
        draw_lp = torch.empty(uniforms.shape, dtype=torch.float32, device=device)
    ids_out = torch.empty((n, k), dtype=torch.int32, device=device)
    lp_out = torch.empty((n, k), dtype=torch.float32, device=device)
    tail_out = torch.empty((n,), dtype=torch.float32, device=device)
    for s in range(0, n, chunk_positions):
        e = min(s + chunk_positions, n)
        chunk = project(flat[s:e]) if project is not None else flat[s:e]  # (C, V) logits
        if uniforms is None:  # fixed top-k: the fast tail
            # (C, V) fp32; with dtype= CUDA upcasts inside the kernel (half_to_float), CPU copies first.
            lp = torch.log_softmax(chunk, dim=-1, dtype=torch.float32)
            del chunk
            vals, idx, tail_out[s:e] = topk_and_tail(lp, k)
            del lp
        else:  # sampled modes: only what the draws and the head need (no full log-softmax, no fp64 pass)
            p = torch.softmax(chunk, dim=-1, dtype=torch.float32)
            del chunk  # the logits are not needed once p exists: one (C, V) buffer during the draws
            vals, idx, tail_out[s:e], draw_ids[s:e], draw_lp[s:e] = sampled_chunk(p, k, uniforms[s:e], tail_only)
            del p
        ids_out[s:e] = idx.to(torch.int32)
        lp_out[s:e] = vals
    d_ids = draw_ids.cpu().numpy() if uniforms is not None else None
    d_lp = draw_lp.cpu().numpy() if uniforms is not None else None
    return ids_out.cpu().numpy(), lp_out.cpu().numpy(), tail_out.cpu().numpy(), d_ids, d_lp
