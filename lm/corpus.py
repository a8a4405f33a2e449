"""Corpus input and tokenization for stage 1.

`load_sequences(data, tokenizer, seq_len=...)` turns a corpus into the token sequences the teacher
scores and the student later trains on. Stage 2 never re-tokenizes, so what is decided here is final.

Input
    A local `.jsonl` / `.json` / `.parquet` / `.txt` file (optionally `.gz`), a directory of files of
    one of those formats (read recursively, in sorted path order), a `datasets.Dataset`, a list of
    dicts, or a Hugging Face hub dataset name (`load_dataset(name, split=split)`; needs the network).
    A `.txt` file is one document (as `load_dataset("text", sample_by="document")`). Files are read
    here (JSON lines line by line, parquet by row group), not through `datasets`, so that a byte or row
    range can be read without the rest; a line that is not valid JSON is an error naming the file and
    byte offset. Compressed files and JSON-array files are read whole (they cannot be split).

Row formats
    plain text: `row[text_field]` is a string; every token is trained.
    chat: `row[messages_field]` is an OpenAI-style list of `{"role", "content"}` dicts rendered with
        the tokenizer's chat template. Only the tokens of assistant turns are trained (the text the
        template emits after the generation prompt up to and including the end-of-turn marker), unless
        `train_on_prompt`. The assistant spans are found by rendering prefixes of the conversation
        and diffing token counts, which works with any template whose renderings of prefixes are
        token prefixes of the whole rendering; a template without that property is an error.
    Empty / non-string text rows, malformed conversations, conversations the template refuses and rows
    left without a trained token (no assistant turn) are skipped, counted by kind in `skipped_kinds`, and
    reported in one `logging` warning naming the first row numbers of each kind (counted from 1, as a user
    counts lines). A message whose role the chat template does not know (`template_roles`) is an error
    naming the row and the template's roles, unless the role is in `allow_roles`.

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

Shards (`plan_corpus`, `load_range`)
    Stage 1 splits a corpus into contiguous ranges of rows decided from file sizes and parquet footers
    alone (see "input" below), and each range is tokenized and packed ON ITS OWN: a shard never depends
    on the rows of another, so a task reads and tokenizes only its share. Packing therefore restarts at
    every range boundary (one short sequence per range at most); `load_sequences` is the one-range case.
    This is corpus fingerprint version 2; version 1 packed the whole corpus as one stream.

Determinism
    Same corpus + tokenizer + settings give the same sequences, `sample_id`s (0..n-1 in order, from
    `first_sample_id` for a range) and `fingerprint` on every node. `max_samples=n` stops reading once n
    sequences exist and yields exactly the first n sequences of the unlimited run.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq
import zstandard

from .paths import COMPRESSED_SUFFIXES, looks_like_local_path

logger = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_ROW_BATCH = 256  # rows per tokenizer call: encoded in parallel (Rust threads); larger batches cost RSS, not speed
_WARN_ROWS = 5
FINGERPRINT_VERSION = 2  # 2: shards are packed per document range (see "Shards")


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
    skipped_rows: list[int] = field(default_factory=list)  # the first few skipped row numbers (from 1)
    # kind -> [count, first few row numbers (from 1)], for every kind of skipped row (see `_SKIP_KINDS`)
    skipped_kinds: dict[str, list] = field(default_factory=dict)

    def skip(self, kind: str, row: int) -> None:
        """Count row `row` (from 1) as skipped for reason `kind`."""
        entry = self.skipped_kinds.setdefault(kind, [0, []])
        entry[0] += 1
        if len(entry[1]) < _WARN_ROWS:
            entry[1].append(row)
        if kind != "untrained":
            self.skipped += 1
            if len(self.skipped_rows) < _WARN_ROWS:
                self.skipped_rows.append(row)
        else:
            self.untrained_documents += 1

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)


# --------------------------------------------------------------------------------------------- input


def _builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


#
# A corpus is planned before it is read: `plan_corpus` lists its pieces (files, or an in-memory / hub
# dataset) and gives each a weight (bytes for files, rows for datasets), laid end to end on one axis of
# `CorpusPlan.total` units. Range [lo, hi) of that axis owns every row whose start lies in it: for an
# uncompressed JSON-lines file the byte offset of the line (the rule of Hadoop's input splits, so a
# range that starts inside a line skips it and one that ends inside a line finishes it), for a parquet
# file or a dataset row r of N the point r*size//N, for a file read whole (compressed, a JSON array, a
# .txt document) its first byte. Shard i of n is the range [total*i//n, total*(i+1)//n): which rows it
# holds is decided from file sizes and parquet footers alone, and reading it touches only its bytes.

_HEAD_TAIL = 4096  # bytes of each file's head and tail in the identity: a cheap check, not a content hash


@dataclass(frozen=True)
class _Piece:
    kind: str  # "lines" (splittable JSON lines) | "parquet" | "whole" (read whole) | "rows" (a dataset)
    name: str  # display / identity name: the path relative to the corpus root, or "<dataset>"
    weight: int  # units on the plan's axis: bytes of a file (at least 1), rows of a dataset
    rows: int = 0  # parquet / dataset rows
    path: str | None = None
    builder: str | None = None  # json | parquet | text
    compressed: bool = False


class CorpusPlan:
    """The pieces of a corpus on one axis (see above). Picklable when built from files or a hub name
    (a Ray worker re-plans nothing: it reads its range of the same plan)."""

    def __init__(self, display: str, pieces: list[_Piece], identity: dict, data=None, hub: tuple | None = None):
        self.display, self.pieces, self.identity = display, pieces, identity
        self._data = data  # an in-memory dataset or list of rows ("rows" pieces)
        self._hub = hub  # (name, split) of a hub dataset, re-opened lazily after unpickling
        self.bases = [0]
        for p in pieces:
            self.bases.append(self.bases[-1] + p.weight)

    @property
    def total(self) -> int:
        return self.bases[-1]

    def __getstate__(self):
        d = dict(self.__dict__)
        if self._hub is not None:
            d["_data"] = None  # the worker opens the (cached) hub dataset itself
        return d

    def _dataset(self):
        if self._data is None and self._hub is not None:
            self._data = datasets.load_dataset(self._hub[0], split=self._hub[1])
        return self._data

    def split_range(self, index: int, count: int) -> tuple[int, int]:
        """[lo, hi) of the axis that shard `index` of `count` owns."""
        if not 0 <= index < count:
            raise ValueError(f"shard index {index} is not in 0..{count - 1}")
        return self.total * index // count, self.total * (index + 1) // count

    def columns(self, limit: int = 100) -> list[str]:
        """Column names seen in the first piece's first `limit` rows (its schema for parquet / datasets)."""
        for p in self.pieces:
            if p.kind == "parquet":
                return list(pq.ParquetFile(p.path).schema_arrow.names)
            if p.kind == "rows":
                data = self._dataset()
                if isinstance(data, (datasets.Dataset, datasets.IterableDataset)):
                    return list(data.column_names or [])
            seen: dict[str, None] = {}
            for i, row in enumerate(self._rows_of(p, 0, p.weight, base=0)):
                if isinstance(row, dict):
                    seen.update(dict.fromkeys(row))
                if i + 1 >= limit:
                    break
            if seen or p.weight:
                return list(seen)
        return []

    def is_hub_or_dataset(self) -> bool:
        return any(p.kind == "rows" for p in self.pieces)

    def values(self, column: str, lo: int = 0, hi: int | None = None) -> Iterator[Any]:
        """`row[column]` (None where absent) of every row owned by [lo, hi), in corpus order."""
        hi = self.total if hi is None else hi
        for p, base in zip(self.pieces, self.bases):
            if p.weight == 0 or base >= hi or base + p.weight <= lo:
                continue
            a, b = max(lo - base, 0), min(hi - base, p.weight)
            if p.kind == "parquet":
                yield from self._parquet_values(p, column, a, b)
            elif p.kind == "rows":
                yield from self._dataset_values(column, a, b)
            else:
                for row in self._rows_of(p, a, b, base):
                    yield row.get(column) if isinstance(row, dict) else None

    # -- readers of one piece, local range [a, b) of its weight

    def _rows_of(self, p: _Piece, a: int, b: int, base: int) -> Iterator[Any]:
        if p.kind == "whole":
            if a > 0:  # the file's first byte is owned by an earlier range
                return
            yield from _whole_file_rows(p)
        elif p.kind == "lines":
            yield from _line_rows(p, a, b)
        elif p.kind == "rows":
            data = self._dataset()
            for i in range(a, b):
                yield data[i]

    def _parquet_values(self, p: _Piece, column: str, a: int, b: int) -> Iterator[Any]:
        r0, r1 = _first_row(a, p.rows, p.weight), _first_row(b, p.rows, p.weight)
        if r0 >= r1:
            return
        pf = pq.ParquetFile(p.path)
        if column not in pf.schema_arrow.names:
            raise ValueError(f"column {column!r} not found in {p.path}; available: {', '.join(pf.schema_arrow.names)}")
        start = 0
        for g in range(pf.num_row_groups):  # only the row groups that overlap the range are read
            n = pf.metadata.row_group(g).num_rows
            lo, hi = max(r0, start), min(r1, start + n)
            if lo < hi:
                col = pf.read_row_group(g, columns=[column]).column(0)
                yield from col.slice(lo - start, hi - lo).to_pylist()
            start += n
            if start >= r1:
                break

    def _dataset_values(self, column: str, a: int, b: int) -> Iterator[Any]:
        data = self._dataset()
        if isinstance(data, datasets.Dataset):
            sub = data.select(range(a, b)).select_columns([column])
            for batch in sub.iter(batch_size=1024):
                yield from batch[column]
        else:
            for row in data[a:b]:
                yield row.get(column) if isinstance(row, dict) else None


def _first_row(x: int, rows: int, weight: int) -> int:
    """The smallest r with r*weight//rows >= x (row r of `rows` sits at point r*weight//rows)."""
    if x <= 0 or rows == 0:
        return 0
    return min(rows, -(-x * rows // weight))


def _open_text(p: _Piece):
    if p.compressed:
        suffix = Path(p.path).suffix.lower()
        if suffix == ".gz":
            return gzip.open(p.path, "rb")
        if suffix == ".bz2":
            return bz2.open(p.path, "rb")
        if suffix == ".xz":
            return lzma.open(p.path, "rb")
        return zstandard.open(p.path, "rb")
    return open(p.path, "rb")


def _parse_json_line(line: bytes, p: _Piece, offset: int | None, line_no: int | None = None):
    try:
        return json.loads(line)
    except UnicodeDecodeError as e:
        where = _where(p, offset, line_no)
        raise ValueError(
            f"{p.path}: {where} is not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
            f"re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or fix or remove that line"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{p.path}: {_where(p, offset, line_no)} is not valid JSON ({e}); fix or remove that line"
        ) from None


def _where(p: _Piece, offset: int | None, line_no: int | None) -> str:
    """'line L (byte B)' of a file, the line counted from 1 (counted on this error path only)."""
    if line_no is None and offset is not None:
        with open(p.path, "rb") as f:
            line_no, left = 1, offset
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                line_no += chunk.count(b"\n")
                left -= len(chunk)
    if line_no is None:
        return "a line"
    return f"line {line_no}" + (f" (byte {offset})" if offset is not None else "")


def _whole_file_rows(p: _Piece) -> Iterator[Any]:
    with _open_text(p) as f:
        if p.builder == "text":  # one document per .txt file, as `datasets`' sample_by="document"
            data = f.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                line = data[: e.start].count(b"\n") + 1
                raise ValueError(
                    f"{p.path}: line {line} is not UTF-8 text (byte 0x{data[e.start]:02x} at byte {e.start}); "
                    f"re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
                ) from None
            yield {"text": text}
            return
        head = f.read(1 << 16)
        first = head.lstrip()[:1]
        if first == b"[":  # a JSON array of rows
            rows = _parse_json_line(head + f.read(), p, None, 1)
            yield from (rows if isinstance(rows, list) else [rows])
            return
        rest = _prepend(head, f)
        for n, line in enumerate(rest, 1):
            if line.strip():
                yield _parse_json_line(line, p, None, n)


def _prepend(head: bytes, f) -> Iterator[bytes]:
    """Lines of `head` followed by the rest of file `f`."""
    buf = head
    for chunk in iter(lambda: f.read(1 << 20), b""):
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line
    if buf:
        yield buf


def _line_rows(p: _Piece, a: int, b: int) -> Iterator[Any]:
    """Rows of the JSON lines that START in bytes [a, b) of the file (Hadoop's LineRecordReader rule)."""
    with open(p.path, "rb", buffering=1 << 20) as f:
        if a > 0:
            f.seek(a - 1)
            f.readline()  # the line holding byte a-1 began before a: the previous range reads it
        pos = f.tell()
        while pos < b:
            line = f.readline()
            if not line:
                break
            if line.strip():
                yield _parse_json_line(line, p, pos)
            pos += len(line)


def _file_identity(path: Path, name: str) -> dict:
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_HEAD_TAIL))
        if size > _HEAD_TAIL:
            f.seek(max(size - _HEAD_TAIL, _HEAD_TAIL))
            h.update(f.read())
    return {"name": name, "bytes": size, "head_tail_sha256": h.hexdigest()[:32]}


def _file_piece(path: Path, name: str, builder: str) -> _Piece:
    compressed = path.suffix.lower() in COMPRESSED_SUFFIXES
    size = path.stat().st_size
    if builder == "parquet":
        if compressed:
            raise ValueError(f"{path}: compressed parquet files are not supported; parquet compresses itself")
        return _Piece("parquet", name, size, rows=pq.ParquetFile(path).metadata.num_rows, path=str(path))
    if builder == "json" and not compressed:
        with open(path, "rb") as f:
            first = f.read(1024).lstrip()[:1]  # JSON array or JSON lines: the first byte tells
        if first != b"[":  # JSON lines: splittable by bytes
            return _Piece("lines", name, size, path=str(path), builder=builder)
    return _Piece("whole", name, max(size, 1), path=str(path), builder=builder, compressed=compressed)


def plan_corpus(data, *, split: str = "train") -> CorpusPlan:
    """The plan of a local file / directory / hub dataset name / `datasets.Dataset` / list of dicts."""
    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise ValueError(f"got a DatasetDict with splits {list(data)}; pass one split, e.g. data[{split!r}]")
    if isinstance(data, datasets.IterableDataset):
        rows = list(data)  # not addressable by row: read it once (an API convenience for small data)
        return _rows_plan(rows, "the given dataset")
    if isinstance(data, datasets.Dataset):
        ident = {"dataset_fingerprint": getattr(data, "_fingerprint", None), "rows": len(data)}
        return CorpusPlan("the given dataset", [_Piece("rows", "<dataset>", len(data), rows=len(data))], ident, data)
    if not isinstance(data, (str, os.PathLike)):
        return _rows_plan(list(data), "the given dataset")
    name = os.fspath(data)
    path = Path(name).expanduser()
    if path.is_file():
        builder = _builder_for(path)
        if builder is None:
            raise ValueError(
                f"unsupported corpus file {name}: expected one of {', '.join(_BUILDERS)} (optionally compressed)"
            )
        files = [(path, path.name)]
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
        files = [(p, p.relative_to(path).as_posix()) for p in found]
    elif looks_like_local_path(name, file_suffixes=tuple(_BUILDERS)):
        raise FileNotFoundError(f"corpus not found: {name}")
    else:
        ds = load_corpus(name, split=split)
        ident = {"hub": name, "split": split, "dataset_fingerprint": getattr(ds, "_fingerprint", None), "rows": len(ds)}
        return CorpusPlan(name, [_Piece("rows", "<dataset>", len(ds), rows=len(ds))], ident, ds, hub=(name, split))
    # Absolute paths for reading (a Ray worker's working directory is not the driver's); the identity
    # uses the names relative to the corpus root, so two nodes that mount it elsewhere agree.
    pieces = [_file_piece(p.resolve(), n, builder) for p, n in files]
    ident = {"files": [_file_identity(p, n) for p, n in files]}
    return CorpusPlan(name, pieces, ident)


def _rows_plan(rows: list, display: str) -> CorpusPlan:
    h = hashlib.sha256(json.dumps(rows, sort_keys=True, default=repr).encode())
    return CorpusPlan(
        display, [_Piece("rows", "<rows>", len(rows), rows=len(rows))], {"rows_sha256": h.hexdigest()}, rows
    )


def load_corpus(data: str | os.PathLike, *, split: str = "train"):
    """A Hugging Face hub dataset name as a `datasets.Dataset` (one split)."""
    try:
        return datasets.load_dataset(os.fspath(data), split=split)
    except Exception as e:  # the hub raises many types; the user needs the name and the cause
        raise FileNotFoundError(
            f"corpus {os.fspath(data)!r} is not a local file or directory, and loading it as a Hugging Face hub "
            f"dataset (split={split!r}) failed: {type(e).__name__}: {e}"
        ) from e


def check_column(plan: CorpusPlan, column: str, option: str) -> None:
    """Fail before any work when the corpus has no `column` (looked up in its first rows / schema)."""
    available = plan.columns()
    if not available and not plan.is_hub_or_dataset():
        first = next((p.path for p in plan.pieces if p.path), plan.display)
        raise ValueError(
            f"{first}: no rows (an empty file, or only blank lines); give a corpus with at least one row holding "
            f"{column!r}"
        )
    if column not in available:
        raise ValueError(
            f"column {column!r} not found in {plan.display}; available: {', '.join(available) or '(none)'}; "
            f"pass {option}"
        )


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


# The OpenAI roles; a template that prints `message['role']` as it is renders these (and anything else) alike.
STANDARD_ROLES = ("system", "user", "assistant", "tool")
_ROLE_COMPARED = re.compile(r"""role['"]?\]?\s*(?:==|!=)\s*['"]([A-Za-z_][\w-]*)['"]""")
_ROLE_IN_LIST = re.compile(r"""role['"]?\]?\s+(?:not\s+)?in\s*[\[(]([^\])]*)[\])]""")
_ROLE_PRINTED = re.compile(r"""\{\{[^}]*role[^}]*\}\}""")


def template_roles(template: str) -> set[str]:
    """The message roles a chat template knows: those it compares `role` with, plus the standard roles when it
    prints the role as it is (ChatML-like templates)."""
    roles = set(_ROLE_COMPARED.findall(template))
    for group in _ROLE_IN_LIST.findall(template):
        roles.update(re.findall(r"""['"]([A-Za-z_][\w-]*)['"]""", group))
    if _ROLE_PRINTED.search(template) or not roles:
        roles.update(STANDARD_ROLES)
    return roles


class _ChatTokenizer:
    def __init__(self, tokenizer, train_on_prompt: bool, allow_roles: tuple[str, ...] = ()):
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                "chat rows need one (set tokenizer.chat_template, or use plain-text rows)"
            )
        self.tok = tokenizer
        self.train_on_prompt = train_on_prompt
        texts = template.values() if isinstance(template, dict) else [template]
        self.known_roles = set().union(*(template_roles(t) for t in texts))
        self.roles = self.known_roles | set(allow_roles)

    def check_roles(self, messages: list[dict], row: int, display: str) -> None:
        """A role the template does not know is an error (a template would drop it, or render it as it is)."""
        for m in messages:
            if m["role"] not in self.roles:
                name = getattr(self.tok, "name_or_path", "the tokenizer")
                raise ValueError(
                    f"{display}: row {row}: chat role {m['role']!r} is not one of the roles the chat template of "
                    f"{name!r} knows ({', '.join(sorted(self.known_roles))}). "
                    f"Fix the row, or pass allow_roles={m['role']} to render it as the template does."
                )

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
    allow_roles: tuple[str, ...] = (),
    display: str = "the corpus",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (ids int32, trained bool) per valid document with at least one trained token. Skipped rows are
    counted in `result` by kind, numbered from 1 within the range read."""
    chat_tok = _ChatTokenizer(tokenizer, train_on_prompt, allow_roles) if chat else None
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
            docs: list[tuple[np.ndarray, np.ndarray] | str | None] = []
            for offset, value in enumerate(batch):
                conv = _clean_conversation(value)
                if conv is None:
                    docs.append("malformed")
                    continue
                chat_tok.check_roles(conv, row + offset + 1, display)
                try:
                    docs.append(chat_tok(conv, row + offset + 1))
                except ChatTemplateError:
                    raise
                except Exception as e:  # a template may refuse a conversation (e.g. roles must alternate)
                    if len(template_errors) < 1:
                        template_errors.append(f"{type(e).__name__}: {e}")
                    docs.append("template")
        else:
            valid = [i for i, v in enumerate(batch) if _valid_text(v)]
            encoded = (
                tokenizer(
                    [batch[i] for i in valid], add_special_tokens=True, return_attention_mask=False, verbose=False
                )["input_ids"]
                if valid
                else []
            )
            docs = ["empty"] * len(batch)
            for i, ids in zip(valid, encoded):
                arr = np.asarray(ids, dtype=np.int32)
                docs[i] = (arr, np.ones(len(arr), dtype=bool))
        for offset, doc in enumerate(docs):
            result.rows_read += 1
            if isinstance(doc, str) or len(doc[0]) == 0:
                result.skip(doc if isinstance(doc, str) else "empty", row + offset + 1)
                continue
            ids, trained = doc
            if ids[-1] != eos:
                ids = np.append(ids, np.int32(eos))
                trained = np.append(trained, eos_trained)
            # The first token is never a prediction target, so it cannot make a document useful.
            if not trained[1:].any():
                result.skip("untrained", row + offset + 1)
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


def _check_settings(tokenizer, seq_len, max_samples) -> int:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r}: need an int >= 2 (a sequence of T tokens has T-1 predictions)")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples={max_samples!r}: need a positive int or None")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; it is needed to separate documents")
    return int(eos)


def corpus_settings(
    tokenizer,
    *,
    seq_len: int,
    text_field: str = "text",
    messages_field: str | None = None,
    train_on_prompt: bool = False,
    max_samples: int | None = None,
    pack: bool = True,
    allow_roles: str | list[str] | None = None,
) -> dict[str, Any]:
    """What decides the sequences besides the corpus itself (recorded in the run spec). `allow_roles`: chat roles
    to render although the template does not name them (comma-separated); recorded only when given."""
    eos = _check_settings(tokenizer, seq_len, max_samples)
    chat = messages_field is not None
    extra = {}
    if allow_roles:
        roles = allow_roles.split(",") if isinstance(allow_roles, str) else list(allow_roles)
        extra["allow_roles"] = sorted({r.strip() for r in roles if r.strip()})
    return {
        **extra,
        "fingerprint_version": FINGERPRINT_VERSION,
        "format": "chat" if chat else "text",
        "field": messages_field if chat else text_field,
        "seq_len": seq_len,
        "pack": pack,
        "train_on_prompt": train_on_prompt,
        "max_samples": max_samples,
        "eos_token_id": eos,
    }


def load_range(
    plan: CorpusPlan,
    tokenizer,
    settings: dict[str, Any],
    *,
    lo: int = 0,
    hi: int | None = None,
    first_sample_id: int = 0,
    allow_empty: bool = False,
    where: str = "",
) -> CorpusResult:
    """Tokenize and pack the rows of `plan` owned by [lo, hi) on its own (see the module docstring).

    `settings` from `corpus_settings`; sample ids count from `first_sample_id`. `allow_empty`: a range
    without a trainable position gives an empty result instead of a ValueError. `where` names the range in
    the warning about skipped rows (row numbers count from the start of the range).
    """
    chat = settings["format"] == "chat"
    column = settings["field"]
    seq_len, max_samples, eos = settings["seq_len"], settings["max_samples"], settings["eos_token_id"]
    result = CorpusResult(sequences=[], fingerprint="", settings=settings)
    template_errors: list[str] = []
    display = plan.display + (f" ({where})" if where else "")
    docs = _documents(
        plan.values(column, lo, hi),
        tokenizer,
        chat=chat,
        train_on_prompt=settings["train_on_prompt"],
        eos=eos,
        result=result,
        template_errors=template_errors,
        allow_roles=tuple(settings.get("allow_roles") or ()),
        display=display,
    )
    chunks = _chunks(docs, seq_len, settings["pack"])
    try:
        for ids, trained in chunks:
            label_mask = trained[1:]
            if not label_mask.any():
                result.dropped_sequences += 1
                continue
            seq = Sequence(
                sample_id=first_sample_id + len(result.sequences),
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
    if result.skipped_kinds:
        logger.warning("%s", skipped_rows_message(result, display, chat, template_errors))
    if not result.sequences and not allow_empty:
        raise ValueError(
            f"no trainable position in {display}: read {result.rows_read} rows, skipped {result.skipped} "
            f"(empty/invalid), {result.untrained_documents} without trained tokens"
            + (
                ""
                if not chat or settings["train_on_prompt"]
                else " (no assistant turns? pass train_on_prompt=True to train on every token)"
            )
        )
    result.fingerprint = corpus_fingerprint(result.sequences, settings)
    return result


_SKIP_KINDS = {
    "empty": "empty or non-string rows",
    "malformed": "malformed conversations (not a list of {role, content} strings)",
    "template": "conversations the chat template refused",
    "untrained": None,  # worded by format below
}


def skipped_rows_message(result: CorpusResult, display: str, chat: bool, template_errors: list[str]) -> str:
    """The one warning about every skipped row of a range: per kind, the count and the first rows (from 1)."""
    parts = []
    total = 0
    for kind in _SKIP_KINDS:
        if kind not in result.skipped_kinds:
            continue
        count, rows = result.skipped_kinds[kind]
        total += count
        what = _SKIP_KINDS[kind] or (
            "conversations without a trained token (no assistant turn; train_on_prompt=True trains every token)"
            if chat
            else "rows too short to train (one token)"
        )
        listed = ", ".join(map(str, rows)) + (", ..." if count > len(rows) else "")
        parts.append(f"{count} {what} (row{'s' if count > 1 else ''} {listed})")
    extra = f"; first template error: {template_errors[0]}" if template_errors else ""
    return f"{display}: skipped {total} row{'s' if total != 1 else ''}: " + "; ".join(parts) + extra


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
    allow_roles: str | list[str] | None = None,
) -> CorpusResult:
    """Tokenize a whole corpus into sequences of at most `seq_len` tokens with their label masks.

    data: path / directory / hub name / `datasets.Dataset` / list of dicts (see the module docstring).
    messages_field: when set, rows are chat conversations read from that column (`text_field` is unused).
    max_samples: stop after this many sequences (the result is the prefix of the unlimited run).
    split: the split of a hub dataset (local files are always one split).
    """
    settings = corpus_settings(
        tokenizer,
        seq_len=seq_len,
        text_field=text_field,
        messages_field=messages_field,
        train_on_prompt=train_on_prompt,
        max_samples=max_samples,
        pack=pack,
        allow_roles=allow_roles,
    )
    plan = plan_corpus(data, split=split)
    check_column(plan, settings["field"], "--messages-field" if messages_field is not None else "--text-field")
    return load_range(plan, tokenizer, settings)


def corpus_fingerprint(sequences: list[Sequence], settings: dict[str, Any]) -> str:
    """sha256 over the settings and each sequence's length, token ids (int32 LE) and packed mask."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    for s in sequences:
        h.update(np.int64(len(s.input_ids)).tobytes())
        h.update(s.input_ids.astype("<i4", copy=False).tobytes())
        h.update(np.packbits(s.label_mask).tobytes())
    return h.hexdigest()


def plan_fingerprint(plan: CorpusPlan, settings: dict[str, Any]) -> str:
    """sha256 over the settings and the plan's identity (file names, sizes, head/tail hashes): what every
    task of a run computes without reading the corpus, so that they agree on a run they share."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(json.dumps(plan.identity, sort_keys=True).encode())
    return h.hexdigest()
