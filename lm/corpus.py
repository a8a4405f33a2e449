"""Corpus input and tokenization for stage 1.

`load_sequences(data, tokenizer, seq_len=...)` turns a corpus into the token sequences the teacher
scores and the student later trains on. Stage 2 never re-tokenizes, so what is decided here is final.

Input
    A local `.jsonl` / `.json` / `.parquet` / `.txt` file (optionally `.gz`), a directory of files of
    one of those formats (read recursively, in sorted path order), a `datasets.Dataset`, a list of
    dicts, or a Hugging Face hub dataset name (`load_dataset(name, split=split)`; needs the network).
    A `.txt` file is one document (`load_dataset("text", sample_by="document")`).

Row formats
    plain text: `row[text_field]` is a string; every token is trained.
    chat: `row[messages_field]` is an OpenAI-style list of `{"role", "content"}` dicts rendered with
        the tokenizer's chat template. Only the tokens of assistant turns are trained (the text the
        template emits after the generation prompt up to and including the end-of-turn marker), unless
        `train_on_prompt`. The assistant spans are found by rendering prefixes of the conversation
        and diffing token counts, which works with any template whose renderings of prefixes are
        token prefixes of the whole rendering; a template without that property is an error.
    Empty / non-string text rows and malformed conversations are skipped, counted in `skipped`, and
    reported once with a `logging` warning naming the first row numbers.

Tokens
    Text is tokenized with the tokenizer's own special-token convention (`add_special_tokens=True`,
    so a Llama tokenizer prepends BOS and a GPT-2 one adds nothing); chat templates already write
    their special tokens. EOS is appended to every document that does not already end with it. The
    appended EOS is trained for text documents (the model should learn where documents end) and, for
    conversations, only with `train_on_prompt` (it is a separator, not something the assistant says).

Packing (default `pack=True`)
    Documents are concatenated in row order and cut into sequences of exactly `seq_len` tokens; the
    final leftover is kept as one shorter sequence. Nothing is ever padded. Attention crosses
    document boundaries (no per-document masking); the teacher and the student see the same
    sequences, so the distillation targets are consistent. Packing is the default because every
    sequence then costs the teacher the same and no compute is spent on padding; a document split
    over two sequences loses its earlier context in the second one, which is the usual trade.
    `pack=False`: each document is its own sequence; a document longer than `seq_len` is split into
    consecutive `seq_len` chunks (nothing is dropped).
    Sequences with no trained prediction (e.g. one token long, or all prompt) are dropped, and so are
    conversations without any trained token; a corpus left with no trained position is a ValueError.

Convention used throughout the project
    For `input_ids` of length T, position t in [0, T-1) predicts `input_ids[t+1]`;
    `label_mask` is bool[T-1] with `label_mask[t] = trained[t+1]`.

Determinism
    Same corpus + tokenizer + settings give the same sequences, `sample_id`s (0..n-1 in order) and
    `fingerprint` on every node. `max_samples=n` stops reading once n sequences exist and yields
    exactly the first n sequences of the unlimited run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from .paths import COMPRESSED_SUFFIXES, looks_like_local_path

logger = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_ROW_BATCH = 256  # rows tokenized per call: the fast tokenizer batches in Rust
_WARN_ROWS = 5
FINGERPRINT_VERSION = 1


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no single truth value
class Sequence:
    sample_id: int
    input_ids: np.ndarray  # int32 (T,)
    label_mask: np.ndarray  # bool (T-1,): label_mask[t] is True when predicting input_ids[t+1] is trained

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 1 or self.label_mask.shape != (max(len(self.input_ids) - 1, 0),):
            raise ValueError(
                f"sample {self.sample_id}: label_mask shape {self.label_mask.shape} does not match "
                f"input_ids shape {self.input_ids.shape}; expected (T-1,)"
            )


@dataclass
class CorpusResult:
    sequences: list[Sequence]
    fingerprint: str  # sha256 of the settings and every sequence's tokens and mask
    settings: dict[str, Any]  # what the fingerprint covers besides the content (for the manifest)
    rows_read: int = 0  # rows looked at (fewer than the corpus when max_samples stopped early)
    documents: int = 0  # rows that became documents with at least one trained token
    skipped: int = 0  # empty, non-string or malformed rows
    untrained_documents: int = 0  # valid conversations without a trained token (e.g. no assistant turn)
    dropped_sequences: int = 0  # cut sequences with no trained prediction
    tokens: int = 0  # sum of len(input_ids)
    trained_positions: int = 0  # sum of label_mask
    skipped_rows: list[int] = field(default_factory=list)  # the first few skipped row numbers

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)


# --------------------------------------------------------------------------------------------- input


def _builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def load_corpus(data: str | os.PathLike, *, split: str = "train"):
    """Load a local file / directory / hub dataset name into a `datasets.Dataset`."""
    name = os.fspath(data)
    path = Path(name).expanduser()
    if path.is_file():
        builder = _builder_for(path)
        if builder is None:
            raise ValueError(
                f"unsupported corpus file {name}: expected one of {', '.join(_BUILDERS)} (optionally compressed)"
            )
        files = [path]
    elif path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and _builder_for(p) and not p.name.startswith("."))
        if not found:
            raise FileNotFoundError(f"no {'/'.join(_BUILDERS)} files in corpus directory {name}")
        builders = {_builder_for(p) for p in found}
        if len(builders) > 1:
            kinds = sorted({"".join(p.suffixes) for p in found})
            raise ValueError(
                f"corpus directory {name} mixes formats ({', '.join(kinds)}); keep one format per directory"
            )
        builder = builders.pop()
        files = found
    elif looks_like_local_path(name, file_suffixes=tuple(_BUILDERS)):
        raise FileNotFoundError(f"corpus not found: {name}")
    else:
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # the hub raises many types; the user needs the name and the cause
            raise FileNotFoundError(
                f"corpus {name!r} is not a local file or directory, and loading it as a Hugging Face hub "
                f"dataset (split={split!r}) failed: {type(e).__name__}: {e}"
            ) from e
        return ds
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)


def _column_iter(data, column: str, option: str, display: str) -> tuple[Iterator[Any], list[str]]:
    """Return an iterator over one column and the list of available columns."""
    if isinstance(data, datasets.Dataset):
        available = list(data.column_names)
        if column not in available:
            raise ValueError(
                f"column {column!r} not found in {display}; available: {', '.join(available)}; pass {option}"
            )

        def it():
            for batch in data.select_columns([column]).iter(batch_size=1024):
                yield from batch[column]

        return it(), available
    if isinstance(data, datasets.IterableDataset):
        available = list(data.column_names or [])
        if available and column not in available:
            raise ValueError(
                f"column {column!r} not found in {display}; available: {', '.join(available)}; pass {option}"
            )
        return (r.get(column) for r in data), available
    rows = list(data)
    available = sorted({k for r in rows if isinstance(r, dict) for k in r})
    if column not in available:
        raise ValueError(f"column {column!r} not found in {display}; available: {', '.join(available)}; pass {option}")
    return (r.get(column) if isinstance(r, dict) else None for r in rows), available


# --------------------------------------------------------------------------------------------- documents


def _valid_text(x: Any) -> bool:
    return isinstance(x, str) and x.strip() != ""


def _clean_conversation(x: Any) -> list[dict] | None:
    """Return the conversation if it is a non-empty list of {role: str, content: str} dicts."""
    if not isinstance(x, list) or not x:
        return None
    out = []
    for m in x:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None
        # Arrow fills keys that only some rows have with None; drop them so the template sees the
        # original message (e.g. `{% if message.tool_calls is defined %}`).
        out.append({k: v for k, v in m.items() if v is not None})
    return out


class ChatTemplateError(ValueError):
    """The chat template cannot be used to locate assistant tokens."""


class _ChatTokenizer:
    def __init__(self, tokenizer, train_on_prompt: bool):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                "chat rows need one (set tokenizer.chat_template, or use plain-text rows)"
            )
        self.tok = tokenizer
        self.train_on_prompt = train_on_prompt

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def __call__(self, messages: list[dict], row: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and the per-token `trained` flags of one conversation."""
        full = self._render(messages, add_generation_prompt=False)
        texts = [full]
        spans = []  # index of each assistant turn, rendered as (before, after) texts below
        if not self.train_on_prompt:
            for i, m in enumerate(messages):
                if m["role"] == "assistant":
                    spans.append(i)
                    texts.append(self._render(messages[:i], add_generation_prompt=True))
                    texts.append(self._render(messages[: i + 1], add_generation_prompt=False))
        encoded = self.tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
        ids = np.asarray(encoded[0], dtype=np.int32)
        if self.train_on_prompt:
            return ids, np.ones(len(ids), dtype=bool)
        trained = np.zeros(len(ids), dtype=bool)
        for j, i in enumerate(spans):
            before, after = encoded[1 + 2 * j], encoded[2 + 2 * j]
            for prefix in (before, after):
                if len(prefix) > len(ids) or not np.array_equal(ids[: len(prefix)], prefix):
                    raise ChatTemplateError(
                        f"cannot find the assistant tokens of row {row}: the chat template of "
                        f"{getattr(self.tok, 'name_or_path', 'the tokenizer')!r} does not render messages[:{i}] "
                        f"(or messages[:{i + 1}]) as a token prefix of the whole conversation (templates that "
                        "rewrite earlier turns, e.g. strip reasoning, do this). Use train_on_prompt=True, or a "
                        "template without that rewriting."
                    )
            trained[len(before) : len(after)] = True
        return ids, trained


def _documents(
    values: Iterator[Any],
    tokenizer,
    *,
    chat: bool,
    train_on_prompt: bool,
    eos: int,
    result: CorpusResult,
    template_errors: list[str],
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (ids int32, trained bool) per valid document with at least one trained token."""
    chat_tok = _ChatTokenizer(tokenizer, train_on_prompt) if chat else None
    eos_trained = (not chat) or train_on_prompt
    row = 0
    done = False
    while not done:
        batch = []
        for _ in range(_ROW_BATCH):
            try:
                batch.append(next(values))
            except StopIteration:
                done = True
                break
        if not batch:
            break
        if chat:
            docs: list[tuple[np.ndarray, np.ndarray] | None] = []
            for offset, value in enumerate(batch):
                conv = _clean_conversation(value)
                if conv is None:
                    docs.append(None)
                    continue
                try:
                    docs.append(chat_tok(conv, row + offset))
                except ChatTemplateError:
                    raise
                except Exception as e:  # a template may refuse a conversation (e.g. roles must alternate)
                    if len(template_errors) < 1:
                        template_errors.append(f"{type(e).__name__}: {e}")
                    docs.append(None)
        else:
            valid = [i for i, v in enumerate(batch) if _valid_text(v)]
            encoded = (
                tokenizer([batch[i] for i in valid], add_special_tokens=True, verbose=False)["input_ids"]
                if valid
                else []
            )
            docs = [None] * len(batch)
            for i, ids in zip(valid, encoded):
                arr = np.asarray(ids, dtype=np.int32)
                docs[i] = (arr, np.ones(len(arr), dtype=bool))
        for offset, doc in enumerate(docs):
            result.rows_read += 1
            if doc is None or len(doc[0]) == 0:
                result.skipped += 1
                if len(result.skipped_rows) < _WARN_ROWS:
                    result.skipped_rows.append(row + offset)
                continue
            ids, trained = doc
            if ids[-1] != eos:
                ids = np.append(ids, np.int32(eos))
                trained = np.append(trained, eos_trained)
            # The first token is never a prediction target, so it cannot make a document useful.
            if not trained[1:].any():
                result.untrained_documents += 1
                continue
            result.documents += 1
            yield ids, trained
        row += len(batch)


def _chunks(docs: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int, pack: bool):
    """Yield (ids, trained) chunks of at most seq_len tokens (see the module docstring)."""
    if not pack:
        for ids, trained in docs:
            for start in range(0, len(ids), seq_len):
                yield ids[start : start + seq_len], trained[start : start + seq_len]
        return
    buf_ids: list[np.ndarray] = []
    buf_trained: list[np.ndarray] = []
    buf_len = 0
    for ids, trained in docs:
        buf_ids.append(ids)
        buf_trained.append(trained)
        buf_len += len(ids)
        if buf_len < seq_len:
            continue
        # Concatenate only when at least one full sequence is ready: O(tokens) overall.
        cat_ids, cat_trained = np.concatenate(buf_ids), np.concatenate(buf_trained)
        n_full = buf_len // seq_len
        for j in range(n_full):
            yield cat_ids[j * seq_len : (j + 1) * seq_len], cat_trained[j * seq_len : (j + 1) * seq_len]
        rest = n_full * seq_len
        buf_ids, buf_trained = [cat_ids[rest:]], [cat_trained[rest:]]
        buf_len -= rest
    if buf_len:
        yield np.concatenate(buf_ids), np.concatenate(buf_trained)


# --------------------------------------------------------------------------------------------- API


def load_sequences(
    data,
    tokenizer,
    *,
    seq_len: int,
    text_field: str = "text",
    messages_field: str | None = None,
    train_on_prompt: bool = False,
    max_samples: int | None = None,
    pack: bool = True,
    split: str = "train",
) -> CorpusResult:
    """Tokenize a corpus into sequences of at most `seq_len` tokens with their label masks.

    data: path / directory / hub name / `datasets.Dataset` / list of dicts (see the module docstring).
    messages_field: when set, rows are chat conversations read from that column (`text_field` is unused).
    max_samples: stop after this many sequences (the result is the prefix of the unlimited run).
    split: the split of a hub dataset (local files are always one split).
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r}: need an int >= 2 (a sequence of T tokens has T-1 predictions)")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples={max_samples!r}: need a positive int or None")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; it is needed to separate documents")

    if isinstance(data, (str, os.PathLike)):
        display = os.fspath(data)
        dataset = load_corpus(data, split=split)
    else:
        display = "the given dataset"
        dataset = data
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise ValueError(f"got a DatasetDict with splits {list(data)}; pass one split, e.g. data[{split!r}]")

    chat = messages_field is not None
    column, option = (messages_field, "--messages-field") if chat else (text_field, "--text-field")
    values, _ = _column_iter(dataset, column, option, display)

    settings = {
        "fingerprint_version": FINGERPRINT_VERSION,
        "format": "chat" if chat else "text",
        "field": column,
        "seq_len": seq_len,
        "pack": pack,
        "train_on_prompt": train_on_prompt,
        "max_samples": max_samples,
        "eos_token_id": int(eos),
    }
    result = CorpusResult(sequences=[], fingerprint="", settings=settings)
    template_errors: list[str] = []
    docs = _documents(
        values,
        tokenizer,
        chat=chat,
        train_on_prompt=train_on_prompt,
        eos=int(eos),
        result=result,
        template_errors=template_errors,
    )
    chunks = _chunks(docs, seq_len, pack)
    try:
        for ids, trained in chunks:
            label_mask = trained[1:]
            if not label_mask.any():
                result.dropped_sequences += 1
                continue
            seq = Sequence(
                sample_id=len(result.sequences),
                input_ids=np.ascontiguousarray(ids, dtype=np.int32),
                label_mask=np.ascontiguousarray(label_mask, dtype=bool),
            )
            result.sequences.append(seq)
            result.tokens += len(ids)
            result.trained_positions += int(label_mask.sum())
            if max_samples is not None and len(result.sequences) >= max_samples:
                break
    finally:
        chunks.close()
        docs.close()
    if result.skipped:
        what = "malformed conversations (not a list of {role, content} strings)" if chat else "empty or non-string rows"
        rows = ", ".join(map(str, result.skipped_rows)) + (", ..." if result.skipped > len(result.skipped_rows) else "")
        extra = f"; first template error: {template_errors[0]}" if template_errors else ""
        logger.warning("%s: skipped %d %s (rows %s)%s", display, result.skipped, what, rows, extra)

    if not result.sequences:
        raise ValueError(
            f"no trainable position in {display}: read {result.rows_read} rows, skipped {result.skipped} "
            f"(empty/invalid), {result.untrained_documents} without trained tokens"
            + (
                ""
                if not chat or train_on_prompt
                else " (no assistant turns? pass train_on_prompt=True to train on every token)"
            )
        )
    result.fingerprint = corpus_fingerprint(result.sequences, settings)
    return result


def corpus_fingerprint(sequences: list[Sequence], settings: dict[str, Any]) -> str:
    """sha256 over the settings and each sequence's length, token ids (int32 LE) and packed mask."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    for s in sequences:
        h.update(np.int64(len(s.input_ids)).tobytes())
        h.update(s.input_ids.astype("<i4", copy=False).tobytes())
        h.update(np.packbits(s.label_mask).tobytes())
    return h.hexdigest()
