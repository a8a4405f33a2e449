"""Realistic-looking synthetic teacher labels (Zipf-like distributions) for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .codec import Encoding
from .layout import shard_path
from .manifest import build_manifest
from .spec import RunSpec, claim_run_dir
from .writer import ShardWriter


def synthetic_topk(rng: np.random.Generator, n: int, vocab_size: int, k: int):
    """(n, k) ids, (n, k) log-probs sorted descending, (n,) exact tail log-mass, from random
    full-vocabulary distributions whose logits follow a Zipf-like profile (peaked and flat positions)."""
    ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
    sharp = rng.uniform(0.6, 2.5, size=(n, 1))
    logits = -sharp * np.log(ranks)[None, :] + rng.normal(0, 0.3, size=(n, vocab_size))
    # Frequent tokens (small ids) are likely everywhere, as in real text.
    perm = np.argsort(rng.random((n, vocab_size)) * np.log1p(ranks)[None, :], axis=1)
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    order = np.argsort(-logp, axis=1)[:, :k]
    top_lp = np.take_along_axis(logp, order, axis=1)
    ids = np.take_along_axis(perm, order, axis=1)
    rest = logp.copy()
    np.put_along_axis(rest, order, -np.inf, axis=1)
    tail = np.logaddexp.reduce(rest, axis=1)
    return ids.astype(np.int32), top_lp.astype(np.float32), tail.astype(np.float32)


def synthetic_spec(
    *,
    k: int = 8,
    vocab_size: int = 512,
    num_shards: int = 2,
    num_sequences: int = 10,
    seq_len: int = 32,
    encoding: Encoding | None = None,
    teacher: str = "synthetic",
) -> RunSpec:
    return RunSpec(
        teacher={"name_or_path": teacher, "config_sha256": "0" * 64, "weights_sha256": "0" * 64, "dtype": "float32"},
        tokenizer={"hash": "synthetic-tokenizer", "vocab_size": vocab_size, "eos_token_id": 0, "pad_token_id": 0},
        vocab_size=vocab_size,
        k=k,
        encoding=(encoding or Encoding()).to_dict(),
        capture={"engine": "synthetic", "dtype": "float32", "mode": "topk"},
        corpus={"fingerprint": "synthetic", "source": "synthetic"},
        seq_len=seq_len,
        num_shards=num_shards,
        num_sequences=num_sequences,
    )


def synthetic_rows(spec: RunSpec, seed: int = 0):
    """Yield (shard_index, sample_id, input_ids, label_mask, ids, logprobs, tail) for every sequence."""
    rng = np.random.default_rng(seed)
    for sid in range(spec.num_sequences):
        T = int(rng.integers(2, spec.seq_len + 1)) if sid % 3 == 2 else spec.seq_len
        input_ids = rng.integers(0, spec.vocab_size, size=T).astype(np.int32)
        mask = rng.random(T - 1) < 0.8
        ids, lp, tail = synthetic_topk(rng, int(mask.sum()), spec.vocab_size, spec.k)
        yield sid % spec.num_shards, sid, input_ids, mask, ids, lp, tail


def write_synthetic_run(run_dir: Path, spec: RunSpec, seed: int = 0, finalize: bool = True):
    claim_run_dir(run_dir, spec)
    enc = Encoding.from_dict(spec.encoding)
    rows = list(synthetic_rows(spec, seed))
    for i in range(spec.num_shards):
        with ShardWriter(
            shard_path(run_dir, i, spec.num_shards),
            fingerprint=spec.fingerprint,
            k=spec.k,
            vocab_size=spec.vocab_size,
            encoding=enc,
            row_group_rows=4,
        ) as w:
            for shard, *row in rows:
                if shard == i:
                    w.add(*row)
            w.close()
    return (build_manifest(run_dir) if finalize else None), rows
