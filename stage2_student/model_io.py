"""Check the student against the run, save it in HF format. (Loading is `lm.loading.load_causal_lm`.)"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
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
_MODEL_SAVE_BEGUN = failpoints.declare("model.save_begun", "training is done; nothing of the final model written yet")
_MODEL_WEIGHTS_WRITTEN = failpoints.declare(
    "model.weights_written", "the weights are in model.tmp/, the tokenizer not yet"
)

# What a Hugging Face save (`save_hf`) writes into a model folder. An existing folder holding anything else was
# added to by someone, and is never replaced (the replacement would delete that file).
HF_SAVE_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)


def foreign_files(model_dir: Path) -> list[str]:
    """Entries of an existing model folder that `save_hf` does not write (a sub-folder counts as foreign)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(
        p.name
        for p in model_dir.iterdir()
        if not (p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in HF_SAVE_FILES))
    )


def check_replaceable(model_dir: Path, option: str) -> None:
    """Refuse to replace a model folder that holds files the save would not write (they would be deleted)."""
    foreign = foreign_files(model_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
        raise ValueError(
            f"{option}: {model_dir} holds files that a model save does not write ({shown}); writing the model "
            f"replaces that folder and would delete them. Move them elsewhere, or choose another {option}."
        )


def model_bytes(model) -> int:
    """Bytes of the model's weights as saved (each shared tensor once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def free_bytes(path: Path) -> int:
    """Bytes free to this user on the filesystem that holds `path` (or would: its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def is_student_output(out: Path) -> dict | None:
    """The config.json a student run wrote into `out` (it records the run's fingerprint), or None."""
    try:
        d = json.loads((Path(out) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and "run_fingerprint" in d else None


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
    _MODEL_SAVE_BEGUN()
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "merge_and_unload"):
        if state_dict is not None:
            model.load_state_dict(state_dict)  # the gathered adapters, before merging them in
            state_dict = None
        model = model.merge_and_unload()
    try:
        model.save_pretrained(
            tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {})
        )
        _MODEL_WEIGHTS_WRITTEN()
        tokenizer.save_pretrained(tmp)
        _chmod_like_umask(tmp)
        for f in tmp.rglob("*"):  # the rename below must not publish data still in the page cache
            if f.is_file():
                fsync_file(f)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a disk that filled up mid-save leaves no half folder behind
        raise
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


def _chmod_like_umask(folder: Path) -> None:
    """The safetensors writer creates its file with mode 0600; give every file and folder of a saved model the
    permissions an ordinary open/mkdir gives under the process's umask (0644 / 0755 under 0022), so another
    account (a server) can read what was written."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in Path(folder).rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
