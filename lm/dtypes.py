"""The one dtype spelling table, shared by every command (`--dtype` of teacher and eval, `--precision` of student).

Torch-free, so the config modules (imported by `pipeline --help`) can check a spelling without importing torch.
"""

from __future__ import annotations

# Every spelling an option accepts -> the canonical name (torch's and vLLM's).
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}

# Where training or evaluation computes full-vocabulary log-probs, float16 is refused: its range overflows them.
NO_FP16 = "fp16 is not supported here: its range overflows full-vocabulary logits; use bf16"


def canonical_dtype(name: str, *, option: str = "dtype", allow_fp16: bool = True) -> str:
    """ "bf16" -> "bfloat16" etc.; an unknown name (or float16 where it is not allowed) is an error naming the
    option and the choices."""
    canon = DTYPE_NAMES.get(str(name).lower())
    choices = [k for k, v in DTYPE_NAMES.items() if allow_fp16 or v != "float16"]
    if canon is None:
        raise ValueError(f"{option}={name!r}: choose auto or one of {', '.join(choices)}")
    if canon == "float16" and not allow_fp16:
        raise ValueError(f"{option}={name!r}: {NO_FP16} (choose auto or one of {', '.join(choices)})")
    return canon
