"""Check the student against the run, save it in HF format. (Loading is `lm.loading.load_causal_lm`.)"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from lm.tokenizer_id import tokenizer_fingerprint
from storage import failpoints
from storage.atomic import fsync_dir, fsync_file
from storage.spec import RunSpec

log = logging.getLogger(__name__)

_MODEL_TMP_WRITTEN = failpoints.declare("model.tmp_written", "the final model is whole in model.tmp/, not yet renamed")
_MODEL_OLD_MOVED = failpoints.declare(
    "model.old_moved", "an earlier model/ was moved to model.old/; model.tmp/ not renamed"
)


class StudentMismatchError(ValueError):
    """The student cannot be trained on this run's labels (different tokenizer or vocabulary)."""


def check_student(spec: RunSpec, tokenizer, model, where: str) -> None:
    """Refuse a student whose tokenizer or vocabulary differs from the teacher's: the shards hold ids."""
    problems = []
    fp = tokenizer_fingerprint(tokenizer)
    stored = spec.tokenizer
    if fp["hash"] != stored.get("hash"):
        problems.append(
            f"tokenizer.hash: student {fp['hash'][:16]}… vs run {str(stored.get('hash'))[:16]}… "
            f"(vocab {fp['vocab_size']} vs {stored.get('vocab_size')}) — the student's tokenizer maps ids "
            f"to different tokens"
        )
    out_dim = model.get_output_embeddings().weight.shape[0]
    if out_dim != spec.vocab_size:
        problems.append(f"vocab_size: student output dimension {out_dim} vs the teacher's {spec.vocab_size}")
    cfg = getattr(model.config, "text_config", None) or model.config
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos is not None and spec.seq_len > max_pos:
        problems.append(
            f"seq_len: the run's sequences have up to {spec.seq_len} tokens, the student's context "
            f"(max_position_embeddings) is {max_pos}; capture a new run with --seq-len <= {max_pos}"
        )
    if problems:
        raise StudentMismatchError(
            f"{where} cannot be trained on this run's labels:\n  "
            + "\n  ".join(problems)
            + "\nUse a student that shares the teacher's tokenizer, or capture a new run with it."
        )


def save_hf(model, tokenizer, out_dir: Path, state_dict: dict | None = None) -> Path:
    """Save a plain HF folder atomically (tmp folder, then rename); LoRA adapters are merged first.
    `state_dict`: the full weights gathered from a sharded (FSDP) model, when the local module holds a shard."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "merge_and_unload"):
        if state_dict is not None:
            model.load_state_dict(state_dict)  # the gathered adapters, before merging them in
            state_dict = None
        model = model.merge_and_unload()
    model.save_pretrained(
        tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {})
    )
    tokenizer.save_pretrained(tmp)
    for f in tmp.rglob("*"):  # the rename below must not publish data still in the page cache
        if f.is_file():
            fsync_file(f)
    _MODEL_TMP_WRITTEN()
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        _MODEL_OLD_MOVED()
    tmp.rename(out_dir)
    fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
