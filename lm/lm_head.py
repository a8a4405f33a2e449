"""The lm_head as a model's forward applies it, and the one check that lm_head(h) reproduces its logits.

Both stages run the head themselves, chunk by chunk, instead of materialising (B, T, V) logits: stage 1 to
take log-softmax and top-k per chunk, stage 2 to fuse the head into the loss. That is only right where the
logits are the head of the final hidden states (plus the few post-processing steps below); `reproduces_logits`
is checked once on the real model rather than trusting a list of architectures.
"""

from __future__ import annotations

import torch

# Config fields of models that rescale or soft-cap logits after the lm_head (Gemma 2/3, Cohere, Granite, ...).
SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scale")


def scaled_logits_setting(config) -> tuple[str, object] | None:
    """(field, value) of the first post-head logit transform `config` turns on, or None."""
    for name in SCALED_LOGITS:
        v = getattr(config, name, None)
        if v not in (None, 1, 1.0):
            return name, v
    return None


def apply_logit_transforms(logits: torch.Tensor, config) -> torch.Tensor:
    """What transformers' forward does to lm_head's output for the models that post-process it; the check
    below catches any model that does something else."""
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling != 1:
        logits = logits / scaling
    return logits


def probe_ids(vocab_size: int, device, n: int = 16) -> torch.Tensor:
    """(1, n) token ids spread over the vocabulary: a short, deterministic input for the check."""
    return (torch.arange(1, n + 1, device=device) * 7919 % max(int(vocab_size), 2))[None]


def reproduces_logits(reference: torch.Tensor, candidate: torch.Tensor, head_dtype: torch.dtype) -> tuple[bool, float]:
    """(agree, relative error): does `candidate` (our head on the hidden states) equal the model's own logits?

    Relative to 1 + max |reference|, within 1e-4 for an fp32 head and 2e-2 for 16-bit heads (their rounding
    differs between a fused and an unfused matmul)."""
    if candidate.shape != reference.shape:
        return False, float("inf")
    scale = float(reference.float().abs().max()) + 1.0
    err = float((candidate.float() - reference.float()).abs().max()) / scale
    return err <= (1e-4 if head_dtype == torch.float32 else 2e-2), err
