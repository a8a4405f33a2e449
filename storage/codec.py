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


@dataclass(frozen=True)
class Encoding:
    ids: str = "plain"
    logprobs: str = "q8gap"
    tail: str = "f16"
    q8_step: float = 1.0 / 12.0
    zstd_level: int = 6
    ids_byte_stream_split: bool = True

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
    def parse(cls, spec: str) -> "Encoding":
        """'exact', 'compact' (the default) or 'ids=delta,logprobs=q8,tail=f16,zstd_level=9'."""
        if spec in ("compact", "default", ""):
            return cls()
        if spec == "exact":
            return cls.exact()
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
        if "ids_byte_stream_split" in kv:
            kv["ids_byte_stream_split"] = kv["ids_byte_stream_split"].lower() in ("1", "true", "yes")
        return cls.from_dict(kv)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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


def tail_from_topk(logprobs: np.ndarray) -> np.ndarray:
    """log(1 - Σ exp(logprobs)) over the last axis, stable; -inf when the top k hold all the mass."""
    lp = np.asarray(logprobs, dtype=np.float64)
    m = lp.max(axis=-1, keepdims=True) if lp.shape[-1] else np.zeros(lp.shape[:-1] + (1,))
    lse = (m[..., 0] + np.log(np.exp(lp - m).sum(axis=-1))) if lp.shape[-1] else np.full(lp.shape[:-1], -np.inf)
    lse = np.minimum(lse, 0.0)
    with np.errstate(divide="ignore"):
        out = np.where(lse > -math.log(2), np.log(-np.expm1(lse)), np.log1p(-np.exp(lse)))
    return out.astype(np.float32)
