"""Weight interpolation between a base model and its fine-tune: WiSE-FT for α in [0, 1], ExPO for α > 1.

    pipeline merge --base Qwen/Qwen3-0.6B --tuned out/lam0/model --alpha 0.5 --out out/lam0-wise05

θ = (1 − α)·θ_base + α·θ_tuned, computed as θ_base + α·(θ_tuned − θ_base) in fp32 and saved in the
tuned model's dtype. α = 0 writes the base's weights and α = 1 the tuned ones bit for bit (the
endpoints are copied, not computed: fp32 arithmetic would round a bf16 weight's neighbours, and
b + 1·(t − b) is not always t in floating point). Bit-exact α = 0 needs the base stored in the tuned
dtype; otherwise the base weights are rounded to it.

Memory: both models in their own dtypes plus one fp32 tensor at a time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig

from lm.loading import load_causal_lm, load_tokenizer
from lm.model_files import resolve_model_dir
from lm.tokenizer_id import tokenizer_fingerprint

from .config import MergeConfig
from .model_io import check_replaceable, save_hf

log = logging.getLogger(__name__)

# Above this the merged model is far outside what ExPO reports as useful (α ≈ 1.1–3): warn, not refuse.
ALPHA_WARN = 3.0
# Config keys that may differ between a base and its fine-tune without changing the architecture.
_CONFIG_IGNORED = {
    "_name_or_path",
    "name_or_path",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "architectures",
    "_commit_hash",
}


def _check_compatible(base_cfg, tuned_cfg, base_model, tuned_model) -> None:
    """Raise listing the first mismatches of architecture, parameter names and shapes."""
    problems = []
    for key in ("model_type", "architectures", "tie_word_embeddings"):
        b, t = getattr(base_cfg, key, None), getattr(tuned_cfg, key, None)
        if b != t:
            problems.append(f"config.{key}: base {b!r} vs tuned {t!r}")
    sb = {k: tuple(v.shape) for k, v in base_model.state_dict().items()}
    st = {k: tuple(v.shape) for k, v in tuned_model.state_dict().items()}
    only_base, only_tuned = sorted(set(sb) - set(st)), sorted(set(st) - set(sb))
    shapes = [f"{k}: base {sb[k]} vs tuned {st[k]}" for k in sorted(set(sb) & set(st)) if sb[k] != st[k]]
    if only_base:
        problems.append(f"{len(only_base)} tensor(s) only in the base, e.g. {only_base[:5]}")
    if only_tuned:
        problems.append(f"{len(only_tuned)} tensor(s) only in the tuned model, e.g. {only_tuned[:5]}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es), e.g. " + "; ".join(shapes[:5]))
    if problems:
        raise ValueError(
            "cannot merge: the base and the tuned model differ in architecture:\n  "
            + "\n  ".join(problems)
            + "\nMerge a fine-tune with the model it was fine-tuned from."
        )
    b, t = base_cfg.to_dict(), tuned_cfg.to_dict()
    differ = sorted(k for k in set(b) | set(t) if k not in _CONFIG_IGNORED and b.get(k) != t.get(k))
    if differ:
        log.warning("base and tuned configs differ in %s; the merged model keeps the tuned model's config", differ)


def merge_models(base: str | Path, tuned: str | Path, alpha: float, out: str | Path, overwrite: bool = False) -> dict:
    """Write θ_base + α·(θ_tuned − θ_base) to `out` (HF format, tuned model's dtype and tokenizer).

    Returns a summary {out, alpha, tensors, elements, dtype}. Raises ValueError for a negative α, a
    different architecture, parameter names or shapes, or a different tokenizer.
    """
    return run(MergeConfig(base=str(base), tuned=str(tuned), alpha=alpha, out=Path(out), overwrite=overwrite))


def run(config: MergeConfig) -> dict:
    """The merge described by `config` (what `pipeline merge` calls); returns the summary of merge_models."""
    with torch.no_grad():
        return _merge(config)


def _merge(config: MergeConfig) -> dict:
    alpha = float(config.alpha)
    if alpha > ALPHA_WARN:
        log.warning(
            "alpha=%g extrapolates %g× the fine-tuning update; ExPO reports gains for α ≈ 1.1–3. "
            "Check the merged model before using it",
            alpha,
            alpha,
        )
    base_dir, tuned_dir = resolve_model_dir(config.base), resolve_model_dir(config.tuned)
    out = config.out
    # save_hf replaces `out` by rename; if it were an input, its weights could still be read lazily.
    for name, d in (("base", base_dir), ("tuned", tuned_dir)):
        if out.resolve() == Path(d).resolve():
            raise ValueError(f"--out {out} is the {name} model's folder; write the merge to a new folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the merged model")
    if out.is_dir() and any(out.iterdir()):
        if not config.overwrite:
            raise ValueError(
                f"--out {out} is not empty; nothing was changed. Pass --overwrite to replace the model there, or "
                f"choose a new --out."
            )
        check_replaceable(out, "--out")

    tok_b, tok_t = load_tokenizer(str(base_dir)), load_tokenizer(str(tuned_dir))
    fp_b, fp_t = tokenizer_fingerprint(tok_b), tokenizer_fingerprint(tok_t)
    if fp_b["hash"] != fp_t["hash"]:
        raise ValueError(
            f"cannot merge: different tokenizers (base {fp_b['hash'][:16]}…, vocab {fp_b['vocab_size']}; "
            f"tuned {fp_t['hash'][:16]}…, vocab {fp_t['vocab_size']}): the same embedding row would mean "
            f"different tokens. Merge a fine-tune with the model it was fine-tuned from."
        )

    base_cfg, tuned_cfg = AutoConfig.from_pretrained(base_dir), AutoConfig.from_pretrained(tuned_dir)
    # "auto": each model in its stored dtype. The merge is written into the tuned model's own tensors,
    # so every tensor keeps the tuned dtype (fp32-kept norms of a bf16 model included).
    base_model = load_causal_lm(str(base_dir), dtype="auto")
    model = load_causal_lm(str(tuned_dir), dtype="auto")
    _check_compatible(base_cfg, tuned_cfg, base_model, model)
    dtype = model.dtype

    base_sd = base_model.state_dict()
    tensors = elements = 0
    # named_parameters() lists a tied weight once, and updating it in place keeps the tie; persistent
    # float buffers follow the same rule so that α = 0 really is the base.
    targets = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n in base_sd]
    for name, t in targets:
        if not t.is_floating_point():
            continue
        if alpha == 1.0:
            pass
        elif alpha == 0.0:
            t.copy_(base_sd[name])
        else:
            b32 = base_sd[name].float()
            t.copy_(b32 + alpha * (t.float() - b32))
        tensors += 1
        elements += t.numel()
    del base_model, base_sd
    save_hf(model, tok_t, out)
    return {
        "out": str(out),
        "alpha": alpha,
        "tensors": tensors,
        "elements": elements,
        "dtype": str(dtype).removeprefix("torch."),
        "base": config.base,
        "tuned": config.tuned,
    }


def summary_line(summary: dict) -> str:
    a = summary["alpha"]
    kind = "base" if a == 0 else "tuned" if a == 1 else "WiSE-FT interpolation" if a < 1 else "ExPO extrapolation"
    return (
        f"merged {summary['tensors']} tensors ({summary['elements']:,} weights, {summary['dtype']}) at alpha={a:g} "
        f"({kind}) -> {summary['out']}"
    )
