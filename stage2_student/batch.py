"""Stored rows -> tensors for the model and the loss: padding, the teacher labels of a micro-batch, and the
KL target each capture mode's stored entries stand for.

`pad_inputs` is the one padding path of stage 2 (labelled micro-batches, replay, evaluation).
"""

from __future__ import annotations

import numpy as np
import torch

from storage import SequenceLabels, mode_of

IGNORE_INDEX = -100


def pad_inputs(seqs, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded model inputs and CE labels for objects with `input_ids` (T,) and `label_mask` (T-1,)."""
    B = len(seqs)
    T = max(len(s.input_ids) for s in seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    label_mask = torch.zeros((B, T - 1), dtype=torch.bool)
    for b, s in enumerate(seqs):
        n = len(s.input_ids)
        input_ids[b, :n] = torch.from_numpy(np.asarray(s.input_ids, dtype=np.int64))
        attention_mask[b, :n] = 1
        label_mask[b, : n - 1] = torch.from_numpy(np.asarray(s.label_mask, dtype=bool))
    labels = torch.where(label_mask, input_ids[:, 1:], torch.full_like(input_ids[:, 1:], IGNORE_INDEX))
    return {
        "input_ids": input_ids,  # (B, T)
        "attention_mask": attention_mask,  # (B, T)
        "label_mask": label_mask,  # (B, T-1)
        "labels": labels,  # (B, T-1), IGNORE_INDEX where untrained
    }


def collate_labels(batch: list[SequenceLabels], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a list of sequences into model inputs plus the teacher labels of every trained position.

    The teacher arrays are flattened over trained positions in row-major (b, t) order, the same
    order as `logits[:, :-1][label_mask]`, so the loss never gathers through padding.
    """
    out = {
        "sample_id": torch.tensor([s.sample_id for s in batch], dtype=torch.long),
        **pad_inputs(batch, pad_id),
        "topk_ids": torch.from_numpy(np.concatenate([s.topk_ids for s in batch]).astype(np.int64)),  # (N, k)
        "topk_logprobs": torch.from_numpy(np.concatenate([s.topk_logprobs for s in batch])),  # (N, k)
        "tail_logprob": torch.from_numpy(np.concatenate([s.tail_logprob for s in batch])),  # (N,)
    }
    if batch[0].sample_counts is not None:
        out["sample_counts"] = torch.from_numpy(
            np.concatenate([s.sample_counts for s in batch]).astype(np.int64)
        )  # (N, k)
    return out


# ---------------------------------------------------------------------------------------------------
# the KL target of each capture mode
#
# The stored labels of each capture mode as one sparse target for the KL: (ids, log-weights, tail).
#
# The loss (losses/) computes KL(w ‖ q) over the stored ids plus one tail bucket of mass `tail`.
# Its gradient w.r.t. the student logits is q − w on the stored ids (and the bucket's share on the
# rest), so an unbiased w gives an unbiased gradient of the true KL(p ‖ q):
#
# - topk, topp: w = the teacher's log-probs, tail = the stored mass outside them. Exact on the stored
#   ids; the distribution inside the tail is left free (the bias FINDINGS §2 measures).
# - sample:     w_j = c_j / N from N draws; no tail bucket. E[w_j] = p_j.
# - hybrid:     w_i = p_i on the exact head; w_j = p_T · c_j / M on the M tail draws; no tail bucket
#               (unless a position has no tail draws). E[w_j] = p_T · p_j / p_T = p_j.
# For the sampled modes the loss value KL(w ‖ q) is not an estimate of KL(p ‖ q) (its expectation is
# larger: ≈ 0.9 per position where KL(p ‖ q) is 0); only its gradient is unbiased. What stage 2 LOGS as
# `kl` is comparable across modes: the batch's `kl_offset` (N,) holds, per position, Σ_c P_c (log p_c − log P_c)
# over the target's categories P (w renormalised as the loss does, plus the tail bucket where there is one)
# with log p_c the stored teacher log-prob of each entry; KL(w ‖ q) + kl_offset = Σ_c P_c (log p_c − log q_c):
#   sample: the mean over the N draws of log p(y) − log q(y), an unbiased estimate of KL(p ‖ q);
#   hybrid: the exact head terms + p_T · the mean over the M tail draws of log p(y) − log q(y), unbiased too.
# (up to the stored log-probs' quantisation: ≤ 0.042 nats per entry with the compact encoding.)
# The "counts" layout of sampled shards (storage.codec, the default since issue 20) stores the drawn ids' log-probs
# only with `pipeline teacher --store-draw-logprobs`; without them (NaN in the batch) there is no `kl_offset` and
# the logged `kl` is the loss's own KL(w ‖ q) to the draw-count target: the training objective's KL term, not an
# estimate of KL(p ‖ q). The loss and its gradient are the same either way.


def with_kl_target_weights(batch: dict, capture: dict) -> dict:
    """The batch with `topk_logprobs` / `tail_logprob` OVERWRITTEN by the KL target of the run's capture mode.

    `capture` is the run spec's capture dict. The loss reads its target from those two keys, so after this
    they hold target log-weights (and the target's tail), which equal the stored log-probs only for the
    "logprobs" modes (topk, topp: the batch is returned as it is). The sampled modes also get `kl_offset` (N,),
    what turns the loss's KL value into an estimate of KL(p ‖ q) for logging (see above). The input batch is not
    modified.
    """
    target = mode_of(capture).target
    if target == "logprobs":
        return batch
    counts = batch["sample_counts"].to(torch.float32)  # (N, K)
    lp, tail = batch["topk_logprobs"], batch["tail_logprob"]
    neg_inf = torch.tensor(float("-inf"))
    drawn = counts > 0
    total = counts.sum(dim=1, keepdim=True)  # (N, 1) draws per position
    share = torch.where(drawn, torch.log(counts) - torch.log(total.clamp(min=1)), neg_inf)
    if target == "draw_counts":
        logw = share
        new_tail = torch.full_like(tail, float("-inf"))
    elif target == "head_and_draws":
        logw = torch.where(drawn, tail[:, None] + share, lp)  # head entries keep their log-probs
        new_tail = torch.where(total[:, 0] > 0, torch.full_like(tail, float("-inf")), tail)
    else:
        raise ValueError(f"capture mode {capture.get('mode')!r}: stage 2 has no KL target of kind {target!r}")
    out = {**batch, "topk_logprobs": logw.to(torch.float32), "tail_logprob": new_tail}
    if torch.isnan(torch.where(drawn, lp, 0.0)).any():  # drawn ids' log-probs not stored: no KL estimate
        return out
    cats = torch.cat([logw, new_tail[:, None].float()], dim=1)  # (N, K+1): the loss's teacher categories
    present = cats > float("-inf")
    a = torch.log_softmax(torch.where(present.any(dim=1, keepdim=True), cats, 0.0), dim=1)  # renormalised
    lp_cats = torch.cat([lp.float(), new_tail[:, None].float()], dim=1)  # stored teacher log-probs
    offset = torch.where(present, a.exp() * (torch.where(present, lp_cats, 0.0) - torch.where(present, a, 0.0)), 0.0)
    return {**out, "kl_offset": offset.sum(dim=1)}  # (N,)


__all__ = ["IGNORE_INDEX", "pad_inputs", "collate_labels", "with_kl_target_weights"]
