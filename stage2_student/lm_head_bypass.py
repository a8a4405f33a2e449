"""Bypass the lm_head: run a causal LM up to its final hidden states and apply the head inside the loss
(`losses.fused.fused_head_ce_kl_sums`).

The model's own forward is used unchanged, except that its output-embedding module returns its input:
`model(...).logits` is then the (B, T, H) final hidden states. That holds only where the logits are
exactly `lm_head(h)`: models that scale or soft-cap them afterwards (Gemma 2's final_logit_softcapping,
Cohere's logit_scale, Granite's logits_scaling), LoRA on the lm_head, or FSDP / DeepSpeed ZeRO (which
shard the matrix outside the module's forward) need the logits path. `fused_head_for` decides, and checks the
equivalence once on the real model before training starts (`lm.lm_head.reproduces_logits`) rather than
trusting a list of names.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from lm.lm_head import probe_ids, reproduces_logits, scaled_logits_setting

log = logging.getLogger(__name__)


class FusedHead:
    """The lm_head of a model whose forward can be told to stop at the final hidden states."""

    def __init__(self, model: torch.nn.Module, module: torch.nn.Linear):
        self.model, self.module = model, module

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias

    @contextlib.contextmanager
    def hidden_states(self):
        """Within the block `model(...).logits` holds the final hidden states (B, T, H)."""
        self.module.forward = _identity  # an instance attribute shadows nn.Linear.forward
        try:
            yield
        finally:
            del self.module.forward

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> logits (..., V): for the few places that need them (replay CE)."""
        return torch.nn.functional.linear(hidden, self.weight, self.bias)


def _identity(x):
    return x


def _why_not(model: torch.nn.Module, *, fsdp: bool) -> tuple[str | None, torch.nn.Module | None]:
    if fsdp:
        return "FSDP / DeepSpeed shard the lm_head outside its forward", None
    scaled = scaled_logits_setting(getattr(model, "config", None))
    if scaled is not None:
        name, v = scaled
        return f"the model rescales its logits after the lm_head (config.{name}={v})", None
    get = getattr(model, "get_output_embeddings", None)
    module = get() if callable(get) else None
    if module is None:
        return "the model exposes no output embeddings (get_output_embeddings() is None)", None
    if type(module) is not torch.nn.Linear:  # LoRA / quantised / custom heads: their forward is not W h + b
        return (
            f"its lm_head is a {type(module).__name__}, not a plain nn.Linear (LoRA or quantisation on the head?)",
            None,
        )
    return None, module


@torch.no_grad()
def _agrees(model: torch.nn.Module, head: FusedHead, device) -> tuple[bool, float]:
    """One short forward both ways: do lm_head(h) and the model's logits agree? (agree, relative error)"""
    ids = probe_ids(head.weight.shape[0], device)
    was_training = model.training
    model.eval()  # dropout would make the two forwards differ
    try:
        logits = model(input_ids=ids).logits
        with head.hidden_states():
            hidden = model(input_ids=ids).logits
        mine = head.logits(hidden.to(head.weight.dtype))
    finally:
        model.train(was_training)
    return reproduces_logits(logits, mine, head.weight.dtype)


def fused_head_for(
    model: torch.nn.Module, setting: str, *, fsdp: bool = False, reason_off: str | None = None, device=None
) -> FusedHead | None:
    """The FusedHead to train with, or None for the logits path.

    setting: "auto" (use it where it is exact, say why not otherwise), "on" (an error where it cannot be
    used), "off". reason_off: the caller's own reason for the logits path (e.g. an online teacher).
    """
    if setting == "off":
        return None
    why, module = (reason_off, None) if reason_off else _why_not(model, fsdp=fsdp)
    head = None
    if why is None:
        head = FusedHead(model, module)
        ok, rel = _agrees(model, head, device if device is not None else head.weight.device)
        if not ok:
            why, head = f"lm_head(final hidden states) differs from the model's logits (relative error {rel:.1e})", None
    if why is None:
        log.info("fused head: the lm_head runs inside the loss, a chunk of positions at a time (no (N, V) logits)")
        return head
    if setting == "on":
        raise ValueError(f"--fused-head on: cannot use the fused lm_head: {why}. Use --fused-head auto or off.")
    log.info("fused head off: %s; computing full logits", why)
    return None
