"""The lm_head as a model's forward applies it, and the one check that lm_head(h) reproduces its logits.

Both stages run the head themselves, chunk by chunk, instead of materialising (B, T, V) logits: stage 1 to
take log-softmax and top-k per chunk, stage 2 to fuse the head into the loss. That is only right where the
logits are the head of the final hidden states (plus the few post-processing steps below); `reproduces_logits`
is checked once on the real model rather than trusting a list of architectures.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

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


def _head_tensor_names(model_dir) -> tuple[list[str], object]:
    """The checkpoint names the output head's weight (and bias) may be stored under, found on a weightless copy of
    the model: the head's own parameter names, then those of the input embedding it is tied to."""
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{model_dir}: {type(model).__name__} has no output embedding (lm_head) to apply")
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight]
    emb = model.get_input_embeddings()
    if getattr(config, "tie_word_embeddings", False) and emb is not None:
        names += [n for n, p in model.named_parameters(remove_duplicate=False) if p is emb.weight and n not in names]
    bias = [n for n, p in model.named_parameters(remove_duplicate=False) if getattr(head, "bias", None) is p]
    return names + [f"bias:{n}" for n in bias], config


def load_output_head(model_dir, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor | None, object]:
    """(weight (V, H), bias (V,) or None, config) of a Hugging Face model folder's lm_head, read from its safetensors
    files without loading the rest of the model (the vLLM engine's hidden-state route applies the head itself)."""
    names, config = _head_tensor_names(model_dir)
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            where = {n: os.path.join(model_dir, fn) for n, fn in json.load(f)["weight_map"].items()}
    else:
        single = os.path.join(model_dir, "model.safetensors")
        if not os.path.isfile(single):
            raise FileNotFoundError(f"{model_dir}: no model.safetensors (or its index) to read the lm_head from")
        with safe_open(single, framework="pt") as f:
            where = {n: single for n in f.keys()}

    def read(name: str) -> torch.Tensor | None:
        for prefix in ("", "model.", "language_model."):  # a head saved under its submodule's name
            if prefix + name in where:
                with safe_open(where[prefix + name], framework="pt") as f:
                    return f.get_tensor(prefix + name).to(device=device, dtype=dtype)
        return None

    weight = next((w for w in (read(n) for n in names if not n.startswith("bias:")) if w is not None), None)
    if weight is None:
        raise ValueError(
            f"{model_dir}: the lm_head weight is stored under none of {[n for n in names if not n.startswith('bias:')]}"
        )
    bias = next((b for b in (read(n[5:]) for n in names if n.startswith("bias:")) if b is not None), None)
    return weight, bias, config
