"""The stored labels of each capture mode as one sparse target for the KL: (ids, log-weights, tail).

The loss (losses.py) computes KL(w ‖ q) over the stored ids plus one tail bucket of mass `tail`.
Its gradient w.r.t. the student logits is q − w on the stored ids (and the bucket's share on the
rest), so an unbiased w gives an unbiased gradient of the true KL(p ‖ q):

- topk, topp: w = the teacher's log-probs, tail = the stored mass outside them. Exact on the stored
  ids; the distribution inside the tail is left free (the bias FINDINGS §2 measures).
- sample:     w_j = c_j / N from N draws; no tail bucket. E[w_j] = p_j.
- hybrid:     w_i = p_i on the exact head; w_j = p_T · c_j / M on the M tail draws; no tail bucket
              (unless a position has no tail draws). E[w_j] = p_T · p_j / p_T = p_j.
For the sampled modes the reported KL value is KL(w ‖ q), not an estimate of KL(p ‖ q); the
gradient is what is unbiased.
"""
from __future__ import annotations

import torch


def to_targets(batch: dict, capture: dict) -> dict:
    """Replace the batch's (topk_logprobs, tail_logprob) by the target log-weights of the capture mode."""
    mode = capture.get("mode", "topk")
    if mode in ("topk", "topp"):
        return batch
    counts = batch["sample_counts"].to(torch.float32)                   # (N, K)
    lp, tail = batch["topk_logprobs"], batch["tail_logprob"]
    neg_inf = torch.tensor(float("-inf"))
    drawn = counts > 0
    total = counts.sum(dim=1, keepdim=True)                              # (N, 1) draws per position
    share = torch.where(drawn, torch.log(counts) - torch.log(total.clamp(min=1)), neg_inf)
    if mode == "sample":
        logw = share
        new_tail = torch.full_like(tail, float("-inf"))
    elif mode == "hybrid":
        logw = torch.where(drawn, tail[:, None] + share, lp)             # head entries keep their log-probs
        new_tail = torch.where(total[:, 0] > 0, torch.full_like(tail, float("-inf")), tail)
    else:
        raise ValueError(f"unknown capture mode {mode!r} in the run spec")
    return {**batch, "topk_logprobs": logw.to(torch.float32), "tail_logprob": new_tail}
