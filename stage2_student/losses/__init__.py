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

Teacher-side categories (``categories``): the stored teacher distribution is a categorical over the valid
top-k ids plus, for ``tail="bucket"``, one tail category holding the rest of the mass, always re-normalised,
so every divergence here is >= 0.

Entry points (all re-exported here):
- ``fused.fused_ce_kl_sums``: the training path. CE and forward KL with their analytic gradients in one pass
  over chunks of positions; bounded memory.
- ``fused.fused_head_ce_kl_sums``: the same from the final hidden states, the lm_head applied inside the
  loss chunk by chunk (no (N, V) logits at all).
- ``reference.ce_sum``, ``topk_kl_sum``, ``topk_reverse_kl_sum``, ``topk_jsd_sum``: plain autograd versions
  (the reference the fused path is tested against; also the only path for reverse KL and JSD).
- ``reference.exact_kl_sum``: full-vocabulary KL from (N, V) teacher log-probs (the online-teacher reference).
- ``reference.loss_weights`` / ``total_loss_sum``: the CE + λ·KL combination ("add" or "mix").
"""

from .categories import LOG_PROB_FLOOR
from .fused import FusedLossSums, fused_ce_kl_sums, fused_head_ce_kl_sums, head_chunk_rows
from .reference import (
    ce_sum,
    exact_kl_sum,
    loss_weights,
    topk_jsd_sum,
    topk_kl_sum,
    topk_reverse_kl_sum,
    total_loss_sum,
)

__all__ = [
    "LOG_PROB_FLOOR",
    "FusedLossSums",
    "ce_sum",
    "exact_kl_sum",
    "fused_ce_kl_sums",
    "fused_head_ce_kl_sums",
    "head_chunk_rows",
    "loss_weights",
    "topk_jsd_sum",
    "topk_kl_sum",
    "topk_reverse_kl_sum",
    "total_loss_sum",
]
