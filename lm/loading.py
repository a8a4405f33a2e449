"""Loading models and tokenizers, the one dtype table, and GGUF -> Hugging Face conversion with its cache.

Both stages and the demo load models through here, so a name or folder or GGUF file means the same thing
everywhere (`model_files.resolve_model_dir` decides what a name points to).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .dtypes import DTYPE_NAMES, canonical_dtype  # noqa: F401  (re-exported: the one table)
from .model_files import resolve_model_dir

log = logging.getLogger(__name__)

CACHE_ENV = "LABEL_ANNEAL_CACHE"
# Written last into a converted folder; a folder without it (or with another source) is not used.
_DONE_MARKER = "label_anneal_source.json"


def torch_dtype(name: str, *, option: str = "dtype") -> torch.dtype:
    return getattr(torch, canonical_dtype(name, option=option))


def load_tokenizer(
    name_or_path: str | os.PathLike,
    gguf_file: str | None = None,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
):
    """The tokenizer of a model folder, hub name or GGUF file inside a folder. chat_template: a Jinja template's
    text that replaces the tokenizer's own (`--chat-template FILE`; `read_chat_template` reads it)."""
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    if trust_remote_code:
        kw["trust_remote_code"] = True
    path = resolve_model_dir(os.fspath(name_or_path), revision=revision, trust_remote_code=trust_remote_code)
    if not gguf_file and Path(path).is_dir() and not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        raise ValueError(
            f"{path}: no tokenizer files (tokenizer.json is missing, and so are {', '.join(TOKENIZER_FILES[1:])}). "
            f"Copy the tokenizer of the model this one comes from into it (tokenizer.json and tokenizer_config.json; "
            f"`tokenizer.save_pretrained('{path}')` writes them)."
        )
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: the tokenizer cannot be loaded ({type(e).__name__}: {e})") from e
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


# Any one of these lets transformers build a tokenizer (fast, sentencepiece or BPE vocab files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tiktoken.model")


def read_chat_template(path: str | os.PathLike | None, *, option: str = "--chat-template") -> str | None:
    """The text of a --chat-template FILE (a Jinja template), or None; a clear error for a missing or empty file."""
    if path is None:
        return None
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{option} {path}: cannot read it ({type(e).__name__}: {e}); pass a Jinja template file"
        ) from None
    if not text.strip():
        raise ValueError(f"{option} {path}: the file is empty; pass a Jinja chat template")
    return text


def model_limits(model_dir: Path, gguf_file: str | None = None, *, trust_remote_code: bool = False):
    """(vocabulary size, context length or None) from the config alone, without loading weights."""
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    if trust_remote_code:
        kw["trust_remote_code"] = True
    cfg = AutoConfig.from_pretrained(model_dir, **kw)
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(cfg.vocab_size), getattr(cfg, "max_position_embeddings", None)


def load_causal_lm(
    name_or_path: str | os.PathLike,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """A trainable causal LM. A GGUF checkpoint is dequantised by transformers and rebuilt as a plain
    model (save_pretrained refuses GGUF-loaded models), so a fine-tuned result saves normally."""
    path = resolve_model_dir(os.fspath(name_or_path), revision=revision, trust_remote_code=trust_remote_code)
    if gguf_file:
        return gguf_as_plain_model(path / gguf_file, dtype)[0]
    kw = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    except Exception:
        check_weight_files(Path(path))  # a damaged weight file: named, with the fix
        raise


def check_weight_files(folder: Path) -> None:
    """Raise ValueError naming the first damaged `*.safetensors` file of a local model folder."""
    damaged = damaged_weight_files(folder)
    if damaged:
        raise ValueError(
            f"{damaged[0][0]}: cannot be read ({damaged[0][1]}); the file is damaged or incomplete (an interrupted "
            f"copy or download?). Copy it again from its source, or save the model again."
        )


def damaged_weight_files(folder: Path) -> list[tuple[Path, str]]:
    """(file, reason) for each `*.safetensors` file of a local model folder whose header or size is wrong."""
    bad = []
    if not folder.is_dir():
        return bad
    for f in sorted(folder.glob("*.safetensors")):
        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                head = fh.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if n < 0 or 8 + n > size:
                    bad.append((f, f"{size:,} bytes, shorter than its header says: truncated"))
                    continue
                meta = json.loads(fh.read(n))
            with safe_open(f, framework="pt") as st:
                st.keys()
            end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                bad.append((f, f"{size:,} bytes, its tensors need {8 + n + end:,}: truncated"))
        except Exception as e:  # safetensors raises its own error type
            bad.append((f, f"{type(e).__name__}: {e}"))
    return bad


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $LABEL_ANNEAL_CACHE, else ~/.cache/label-anneal."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "label-anneal"


def convert_gguf_once(gguf_path: Path, final: Path, source: dict) -> Path:
    """`final`: a plain fp32 Hugging Face folder converted from `gguf_path`, built once.

    Built in a temporary folder beside the final one, marked with `source` and renamed into place: a
    folder under the final name whose marker equals `source` is complete and reused; one with another
    marker (an older conversion, an interrupted copy) is replaced; two racing processes both build and
    one rename wins.
    """
    if _is_done(final, source):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        log.info("converting %s into %s (once; 20-40 s for a 135M model)", gguf_path, final)
        _convert_gguf(gguf_path, tmp)
        _chmod_like_umask(tmp)
        (tmp / _DONE_MARKER).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
        if final.exists():
            if _is_done(final, source):  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            stale = final.with_name(f".{final.name}.stale.{os.getpid()}")
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process renamed its complete folder into place between our check and rename.
            if not _is_done(final, source):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _chmod_like_umask(folder: Path) -> None:
    # mkdtemp makes the folder 0700 (and some writers make 0600 files); a shared cache wants the
    # permissions an ordinary mkdir/open would have given.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


def _is_done(folder: Path, source: dict) -> bool:
    try:
        return json.loads((folder / _DONE_MARKER).read_text()) == source
    except (OSError, ValueError):
        return False


def gguf_as_plain_model(gguf_path: Path, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a GGUF file, as a plain transformers model that `save_pretrained` accepts.

    transformers dequantises GGUF on load (needs `gguf`), but refuses to save a model that carries a
    quantization_config; a fresh model built from the cleaned config takes the same weights (all keys
    match) and saves as a normal folder.
    """
    dtype = dtype or torch.float32
    src_dir, name = str(Path(gguf_path).parent), Path(gguf_path).name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may list lm_head.weight as missing; anything else is a real mismatch.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(
            f"GGUF → HF conversion: weights do not match the config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.generation_config = loaded.generation_config
    return model, tokenizer


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    model, tokenizer = gguf_as_plain_model(gguf_path)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def dequantise_gguf(model_dir: str | os.PathLike, gguf_file: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Dequantise a GGUF checkpoint into a plain fp32 Hugging Face folder that vLLM can load (vLLM 0.32
    has no GGUF loader), under `<cache>/gguf-dequantised/` (see `cache_root`).
    Cached by the GGUF file's resolved path, size and mtime; built in a temporary folder and renamed.
    """
    src = Path(model_dir) / gguf_file
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {model_dir}")
    st = src.stat()
    source = {"gguf": str(src.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    return convert_gguf_once(src, cache_root(cache_dir) / "gguf-dequantised" / f"{src.stem}-{key}", source)
