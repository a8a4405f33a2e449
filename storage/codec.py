"""Column encodings of the shard format (v1), chosen by `bench/storage_bench.py`.

A position's teacher labels are `k` token ids, their log-probs (descending) and the log of the
mass outside the top k (the tail). Three knobs:

- ids      "plain" (default): ids in descending-probability order, written with Parquet's
           BYTE_STREAM_SPLIT (`ids_byte_stream_split`), which lets zstd see the high bytes of
           16-bit ids as one stream. "delta": each position's ids sorted ascending and stored as
           first id + gaps; the gaps are smaller, but the log-probs lose their monotone order
           and cost as much again, and the per-position argsort makes reads 2-3x slower
           (bench/RESULTS.md: 80.1 vs 73.1 B/token at k=32). Either way the reader returns ids
           in descending-probability order.
- logprobs "f32" (lossless), "f16", "q8" or "q8gap" (default): uint8 code c = round(-logprob / step),
           decoded as -c·step. |error| <= step/2 for log-probs >= -255·step; anything lower
           (p < e^-21 at the default step 1/12) is clamped to -255·step, an error of < 1e-9 in
           probability (the nats bound holds above that floor only). "q8gap" stores each
           position's codes as differences from the previous rank (mod 256, so lossless in any
           order): rank-ordered codes rise slowly and the gaps are mostly 0-3.
- tail     "f32" or "f16". The tail is stored, not derived as 1 - Σp, because Σ of quantised
           head probabilities is not accurate enough to recover a small tail mass.

Ids use uint16 when the vocabulary fits (≤ 65,536), uint32 otherwise.

Sampled labels (capture modes sample and hybrid) have a second layout, `sampled_layout`:

- "entries" (label-anneal <= 2026-12-02, and `--encoding exact`): every entry as a top-k entry (ids in
           descending log-prob order, their q8 log-probs), the tail, and a draw count per entry.
- "counts"  (the default for sampled modes since issue 20): what stage 2's loss reads and nothing else. Per
           position the exact head entries (count 0; hybrid only) come first, in rank order, with their
           log-probs; then the distinct drawn ids in ASCENDING id order, stored as the first id and gaps, with
           their draw counts (uint8 when the width fits). The drawn ids' log-probs are stored only with
           `draw_logprobs=true` (`pipeline teacher --store-draw-logprobs`: the logged KL estimate needs them);
           the tail log-mass only where a position has a head (hybrid's p_T) or with `draw_logprobs`.
           Decoded, a missing log-prob or tail is NaN ("not stored").
- `input_ids` "int32" (legacy) or "narrow" (uint16 when the vocabulary fits, the default with "counts").

`to_dict()` leaves out these newer fields while they hold their legacy values, so a run spec written before
them (top-k runs included) keeps its fingerprint, and a shard whose metadata lacks them reads as before.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

_ID_CODECS = ("plain", "delta")
_LP_CODECS = ("f32", "f16", "q8", "q8gap")
_TAIL_CODECS = ("f32", "f16")
_SAMPLED_LAYOUTS = ("entries", "counts")
_INPUT_ID_CODECS = ("int32", "narrow")
# Fields added after the first release, with the values that reproduce the layout of shards written before them.
_LEGACY = {"sampled_layout": "entries", "draw_logprobs": False, "input_ids": "int32"}


@dataclass(frozen=True)
class Encoding:
    ids: str = "plain"
    logprobs: str = "q8gap"
    tail: str = "f16"
    q8_step: float = 1.0 / 12.0
    zstd_level: int = 6
    ids_byte_stream_split: bool = True
    sampled_layout: str = "entries"
    draw_logprobs: bool = False
    input_ids: str = "int32"

    def __post_init__(self):
        problems = []
        if self.ids not in _ID_CODECS:
            problems.append(f"ids={self.ids!r} (choose from {', '.join(_ID_CODECS)})")
        if self.logprobs not in _LP_CODECS:
            problems.append(f"logprobs={self.logprobs!r} (choose from {', '.join(_LP_CODECS)})")
        if self.tail not in _TAIL_CODECS:
            problems.append(f"tail={self.tail!r} (choose from {', '.join(_TAIL_CODECS)})")
        if not (0 < self.q8_step <= 1):
            problems.append(f"q8_step={self.q8_step} (must be in (0, 1])")
        if not (1 <= self.zstd_level <= 22):
            problems.append(f"zstd_level={self.zstd_level} (must be 1..22)")
        if self.sampled_layout not in _SAMPLED_LAYOUTS:
            problems.append(f"sampled_layout={self.sampled_layout!r} (choose from {', '.join(_SAMPLED_LAYOUTS)})")
        if self.input_ids not in _INPUT_ID_CODECS:
            problems.append(f"input_ids={self.input_ids!r} (choose from {', '.join(_INPUT_ID_CODECS)})")
        if self.draw_logprobs and self.sampled_layout != "counts":
            problems.append("draw_logprobs=true needs sampled_layout=counts (the entries layout always stores them)")
        if problems:
            raise ValueError("invalid shard encoding: " + "; ".join(problems))

    @classmethod
    def exact(cls) -> "Encoding":
        """Lossless: what the tests compare engines with."""
        return cls(ids="plain", logprobs="f32", tail="f32")

    @classmethod
    def from_dict(cls, d: dict) -> "Encoding":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown encoding field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def parse(cls, spec: str, *, sampled: bool = False, draw_logprobs: bool = False) -> "Encoding":
        """'exact', 'compact' (the default) or 'ids=delta,logprobs=q8,tail=f16,zstd_level=9'.

        `sampled`: the run's capture mode stores draws; then 'compact' and key=value lists default to the
        "counts" layout with narrow input ids (a key=value list may still say sampled_layout=entries), and
        `draw_logprobs` keeps the drawn ids' log-probs. 'exact' keeps the lossless "entries" layout."""
        if spec == "exact":
            if draw_logprobs:
                raise ValueError("--store-draw-logprobs: the exact encoding stores every log-prob already")
            return cls.exact()
        kv = {} if spec in ("compact", "default", "") else cls._pairs(spec)
        if sampled:
            kv.setdefault("sampled_layout", "counts")
            if kv["sampled_layout"] == "counts":
                kv.setdefault("input_ids", "narrow")
        if draw_logprobs:
            if not sampled:
                raise ValueError("--store-draw-logprobs: only sampled capture modes (sample, hybrid) draw")
            kv["draw_logprobs"] = True
        return cls.from_dict(kv)

    @staticmethod
    def _pairs(spec: str) -> dict:
        kv = {}
        for part in spec.split(","):
            if "=" not in part:
                raise ValueError(f"encoding {spec!r}: expected 'exact', 'compact' or key=value pairs")
            k, v = part.split("=", 1)
            kv[k.strip()] = v.strip()
        for k in ("q8_step",):
            if k in kv:
                kv[k] = float(kv[k])
        if "zstd_level" in kv:
            kv["zstd_level"] = int(kv["zstd_level"])
        for k in ("ids_byte_stream_split", "draw_logprobs"):
            if k in kv:
                kv[k] = kv[k].lower() in ("1", "true", "yes")
        return kv

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in _LEGACY or v != _LEGACY[k]}

    def counts_layout(self) -> bool:
        """Sampled shards in the "counts" layout (distinct drawn ids as gaps + counts; see the module doc)."""
        return self.sampled_layout == "counts"

    def logprob_error_bound(self) -> float:
        """Max |decoded - original| in nats for log-probs above the clamp floor."""
        if self.logprobs == "f32":
            return 0.0
        if self.logprobs == "f16":
            # fp16 has 11 significant bits; log-probs of interest lie in [-64, 0].
            return 64.0 * 2.0**-11
        return self.q8_step / 2.0

    def quantised(self) -> bool:
        return self.logprobs in ("q8", "q8gap")

    def q8_floor(self) -> float:
        return -255.0 * self.q8_step


def id_type(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 65536 else pa.uint32()


def input_id_type(enc: Encoding, vocab_size: int) -> pa.DataType:
    """The input_ids column's element type: int32 (legacy) or the narrowest that holds the vocabulary."""
    return pa.int32() if enc.input_ids == "int32" else id_type(vocab_size)


def count_type(width: int) -> pa.DataType:
    """Draw counts and entries per position in the "counts" layout: uint8 when the width fits."""
    return pa.uint8() if width <= 255 else pa.uint16()


def logprob_type(enc: Encoding) -> pa.DataType:
    return {"f32": pa.float32(), "f16": pa.float16(), "q8": pa.uint8(), "q8gap": pa.uint8()}[enc.logprobs]


def tail_type(enc: Encoding) -> pa.DataType:
    return {"f32": pa.float32(), "f16": pa.float16()}[enc.tail]


def encode_positions(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, enc: Encoding, vocab_size: int):
    """(N, K) ids, (N, K) log-probs, (N,) tail -> flat numpy arrays in storage types.

    Variable counts per position (top-p, sampled labels) arrive padded: id -1 and log-prob -inf after
    each position's valid prefix; only valid entries are stored (the writer stores the counts)."""
    ids = np.asarray(ids)
    logprobs = np.asarray(logprobs, dtype=np.float32)
    valid = ids >= 0
    padded = not valid.all()
    if enc.ids == "delta" and ids.size:
        # Pads sort last (sentinel = vocab_size) and are dropped below.
        key = np.where(valid, ids, vocab_size)
        order = np.argsort(key, axis=1, kind="stable")
        ids = np.take_along_axis(key, order, axis=1)
        logprobs = np.take_along_axis(logprobs, order, axis=1)
        ids = np.concatenate([ids[:, :1], np.diff(ids, axis=1)], axis=1)
    ids_np = ids.astype(np.uint16 if vocab_size <= 65536 else np.uint32)
    if enc.quantised():
        codes = np.rint(-logprobs / enc.q8_step)
        codes = np.clip(np.nan_to_num(codes, posinf=255.0), 0, 255).astype(np.uint8)
        if enc.logprobs == "q8gap" and codes.size:
            codes = np.concatenate([codes[:, :1], np.diff(codes, axis=1)], axis=1)  # uint8: wraps mod 256
        lp_np = codes
    elif enc.logprobs == "f16":
        lp_np = logprobs.astype(np.float16)
    else:
        lp_np = logprobs
    tail_np = np.asarray(tail, dtype=np.float16 if enc.tail == "f16" else np.float32).reshape(-1)
    if padded:
        return ids_np[valid], lp_np[valid], tail_np
    return ids_np.reshape(-1), lp_np.reshape(-1), tail_np


def decode_positions(
    ids_flat: np.ndarray,
    lp_flat: np.ndarray,
    tail_flat: np.ndarray,
    k: int,
    enc: Encoding,
    counts: np.ndarray | None = None,
):
    """Inverse of encode_positions: (N, K) int32 ids, (N, K) float32 log-probs sorted descending, (N,) tail.
    With `counts` (entries per position), positions are padded to K with id -1 and log-prob -inf."""
    n = tail_flat.shape[0]
    if counts is not None:
        valid = np.arange(k)[None, :] < counts[:, None]
        ids = np.full((n, k), -1, dtype=np.int64)
        ids[valid] = ids_flat
        lp_codes = (
            np.zeros((n, k), dtype=lp_flat.dtype) if enc.quantised() else np.full((n, k), -np.inf, dtype=np.float32)
        )
        lp_codes[valid] = lp_flat
    else:
        valid = None
        ids = ids_flat.astype(np.int64).reshape(n, k)
        lp_codes = lp_flat.reshape(n, k)
    if enc.quantised():
        codes = lp_codes
        if enc.logprobs == "q8gap" and n:
            codes = np.cumsum(codes, axis=1, dtype=np.int32) & 0xFF
        lp = codes.astype(np.float32) * np.float32(-enc.q8_step)
    else:
        lp = lp_codes.astype(np.float32)
    if enc.ids == "delta" and n:
        ids = np.cumsum(ids if valid is None else np.where(valid, ids, 0), axis=1)
    if valid is not None:
        ids = np.where(valid, ids, -1)
        lp = np.where(valid, lp, -np.inf).astype(np.float32)
    if enc.ids == "delta" and n:
        order = np.argsort(-lp, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)
        lp = np.take_along_axis(lp, order, axis=1)
    return ids.astype(np.int32), lp, tail_flat.astype(np.float32)


def _lp_store(logprobs: np.ndarray, enc: Encoding) -> np.ndarray:
    """(n, K) float32 log-probs -> (n, K) storage values in the row order given (q8gap: gaps along the row)."""
    if enc.quantised():
        codes = np.rint(-logprobs / enc.q8_step)
        codes = np.clip(np.nan_to_num(codes, posinf=255.0), 0, 255).astype(np.uint8)
        if enc.logprobs == "q8gap" and codes.size:
            codes = np.concatenate([codes[:, :1], np.diff(codes, axis=1)], axis=1)  # uint8: wraps mod 256
        return codes
    return logprobs.astype(np.float16 if enc.logprobs == "f16" else np.float32)


def _lp_load(stored: np.ndarray, enc: Encoding) -> np.ndarray:
    """Inverse of _lp_store on an (n, K) matrix whose stored values form a prefix of each row (0 after it)."""
    if not enc.quantised():
        return stored.astype(np.float32)
    codes = stored
    if enc.logprobs == "q8gap" and codes.size:
        codes = np.cumsum(codes, axis=1, dtype=np.int32) & 0xFF
    return codes.astype(np.float32) * np.float32(-enc.q8_step)


def encode_draws(
    ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, counts: np.ndarray, enc: Encoding, vocab_size: int
) -> dict:
    """Sampled labels in the "counts" layout (see the module doc).

    In: (n, K) ids padded with -1, their log-probs (descending), (n,) tail, (n, K) draw counts (0 on exact
    head entries and padding). Out: flat storage arrays `ids`, `counts`, `logprobs`, `tail` and, per
    position, `entries` (stored entries), `n_logprobs` (stored log-probs) and `has_tail` (bool)."""
    ids = np.asarray(ids).astype(np.int64)
    counts = np.asarray(counts)
    n, K = ids.shape
    valid = ids >= 0
    drawn = counts > 0
    head = valid & ~drawn
    col = np.arange(K, dtype=np.int64)[None, :]
    # Head entries keep their rank order; drawn entries follow by ascending id; padding last.
    key = np.where(head, col, np.where(drawn, K + ids, K + vocab_size + col))
    order = np.argsort(key, axis=1, kind="stable")
    o_ids = np.take_along_axis(ids, order, axis=1)
    o_drawn = np.take_along_axis(drawn, order, axis=1)
    o_counts = np.take_along_axis(counts, order, axis=1)
    o_lp = np.take_along_axis(np.asarray(logprobs, dtype=np.float32), order, axis=1)
    o_valid = np.take_along_axis(valid, order, axis=1)
    # Drawn ids as gaps from the previous drawn id of the position (the first from 0).
    d = np.where(o_drawn, o_ids, 0)
    prev = np.zeros_like(d)
    if K > 1:
        prev[:, 1:] = np.maximum.accumulate(d, axis=1)[:, :-1]
    stored_ids = np.where(o_drawn, o_ids - prev, o_ids)
    n_head = head.sum(axis=1)
    n_drawn = drawn.sum(axis=1)
    n_lp = n_head + (n_drawn if enc.draw_logprobs else 0)
    has_tail = (n_head > 0) | enc.draw_logprobs
    lp_mask = col < n_lp[:, None]  # a prefix of each row: the head, then (diagnostics) the draws
    return {
        "ids": stored_ids[o_valid].astype(np.uint16 if vocab_size <= 65536 else np.uint32),
        "counts": o_counts[o_valid].astype(np.uint8 if K <= 255 else np.uint16),
        "logprobs": _lp_store(np.where(lp_mask, o_lp, 0.0).astype(np.float32), enc)[lp_mask],
        "tail": np.asarray(tail, dtype=np.float16 if enc.tail == "f16" else np.float32).reshape(-1)[has_tail],
        "entries": valid.sum(axis=1),
        "n_logprobs": n_lp,
        "has_tail": has_tail,
    }


def decode_draws(
    ids_flat: np.ndarray,
    counts_flat: np.ndarray,
    lp_flat: np.ndarray,
    tail_flat: np.ndarray,
    entries: np.ndarray,
    k: int,
    enc: Encoding,
):
    """Inverse of encode_draws: (n, k) int32 ids (head in rank order, then drawn ids ascending, -1 padding),
    (n, k) float32 log-probs (NaN where not stored, -inf on padding), (n,) float32 tail (NaN where not
    stored) and (n, k) uint16 draw counts."""
    n = entries.shape[0]
    col = np.arange(k)[None, :]
    valid = col < entries[:, None]
    counts = np.zeros((n, k), dtype=np.uint16)
    counts[valid] = counts_flat
    raw = np.zeros((n, k), dtype=np.int64)
    raw[valid] = ids_flat
    drawn = counts > 0
    n_head = (valid & ~drawn).sum(axis=1)
    ids = np.where(drawn, np.cumsum(np.where(drawn, raw, 0), axis=1), np.where(valid, raw, -1)).astype(np.int32)
    lp = np.where(valid, np.float32(np.nan), np.float32(-np.inf))
    tail = np.full(n, np.nan, dtype=np.float32)
    if lp_flat.size:  # sample mode without draw_logprobs stores none: nothing to decode
        n_lp = n_head + (drawn.sum(axis=1) if enc.draw_logprobs else 0)
        lp_mask = col < n_lp[:, None]
        lp_store = np.zeros((n, k), dtype=lp_flat.dtype)
        lp_store[lp_mask] = lp_flat
        lp = np.where(lp_mask, _lp_load(lp_store, enc), lp)
    if tail_flat.size:
        tail[(n_head > 0) | enc.draw_logprobs] = tail_flat
    return ids, lp.astype(np.float32, copy=False), tail, counts


def tail_from_topk(logprobs: np.ndarray) -> np.ndarray:
    """log(1 - Σ exp(logprobs)) over the last axis, stable; -inf when the top k hold all the mass."""
    lp = np.asarray(logprobs, dtype=np.float64)
    m = lp.max(axis=-1, keepdims=True) if lp.shape[-1] else np.zeros(lp.shape[:-1] + (1,))
    lse = (m[..., 0] + np.log(np.exp(lp - m).sum(axis=-1))) if lp.shape[-1] else np.full(lp.shape[:-1], -np.inf)
    lse = np.minimum(lse, 0.0)
    with np.errstate(divide="ignore"):
        out = np.where(lse > -math.log(2), np.log(-np.expm1(lse)), np.log1p(-np.exp(lse)))
    return out.astype(np.float32)
