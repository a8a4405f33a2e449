"""Where a model's files are, and a cheap content identity of them, without loading the model.

The identity goes into the run spec: two processes (or a restart) that would score with different
weights must not write into one run directory, and a node whose shards are all done should not
have to load a 70B model to find that out.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from huggingface_hub import snapshot_download

from .paths import looks_like_local_path

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_SAMPLE_BLOCK = 1 << 16
_SAMPLE_BLOCKS = 16
_SAMPLE_EDGE = 1 << 20


def resolve_model_dir(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """A local folder for a model given as a folder or a hub name (downloaded or cached by huggingface_hub).
    revision: a hub branch, tag or commit (refused for a local folder, which has no revisions); trust_remote_code
    also fetches the model's own Python files (*.py), which transformers then runs."""
    p = Path(os.path.expanduser(name_or_path))
    if p.is_dir():
        if revision is not None:
            raise ValueError(
                f"--revision {revision!r}: {name_or_path} is a local folder, which has no revisions; "
                f"drop --revision, or pass a hub name"
            )
        return p
    if looks_like_local_path(name_or_path) or p.exists():
        raise FileNotFoundError(
            f"model {name_or_path!r}: no such directory. Pass a folder holding config.json "
            f"and weights (or a GGUF file with --gguf-file), or a hub model name"
        )
    try:
        return Path(
            snapshot_download(
                name_or_path,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
                + (["*.py"] if trust_remote_code else []),
            )
        )
    except Exception as e:
        raise FileNotFoundError(
            f"model {name_or_path!r} is not a local directory and could not be fetched from the hub "
            f"({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Check the name, your network, or pass a local path"
        ) from e


def sampled_file_hash(path: Path) -> str:
    """sha256 of a file's size, first and last MiB and 16 evenly spaced 64 KiB blocks.

    Cheap on multi-GB weights yet different for two fine-tunes of one architecture (which share
    names and sizes); not a full-content hash.
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 2 * _SAMPLE_EDGE + _SAMPLE_BLOCKS * _SAMPLE_BLOCK:
            h.update(f.read())
            return h.hexdigest()
        h.update(f.read(_SAMPLE_EDGE))
        for i in range(1, _SAMPLE_BLOCKS + 1):
            f.seek(size * i // (_SAMPLE_BLOCKS + 2))
            h.update(f.read(_SAMPLE_BLOCK))
        f.seek(size - _SAMPLE_EDGE)
        h.update(f.read())
    return h.hexdigest()


def model_identity(model_dir: Path, *, name_or_path: str, gguf_file: str | None = None) -> dict:
    """{name_or_path, gguf_file, config_sha256, weights_sha256} of a local model folder."""
    model_dir = Path(model_dir)
    if gguf_file is not None:
        gguf = model_dir / gguf_file
        if not gguf.is_file():
            raise FileNotFoundError(f"--gguf-file {gguf_file!r}: not found in {model_dir}")
        files = [gguf]
        config_sha = None  # the config lives inside the GGUF file, covered by its hash
    else:
        config = model_dir / "config.json"
        if not config.is_file():
            raise FileNotFoundError(
                f"model {name_or_path!r}: {model_dir} has no config.json. Is it a Hugging Face "
                f"model folder? For a GGUF checkpoint pass --gguf-file NAME"
            )
        config_sha = hashlib.sha256(config.read_bytes()).hexdigest()
        files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"model {name_or_path!r}: no weight files (*.safetensors, *.bin) in {model_dir}")
    h = hashlib.sha256()
    for p in files:
        h.update(json.dumps([p.name, p.stat().st_size, sampled_file_hash(p)]).encode())
    return {
        "name_or_path": name_or_path,
        "gguf_file": gguf_file,
        "config_sha256": config_sha,
        "weights_sha256": h.hexdigest(),
    }
