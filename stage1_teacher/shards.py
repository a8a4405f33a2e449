"""The shard as the unit of stage-1 work, shared by the local driver (`run.py`) and the Ray driver.

A shard is a contiguous range of the corpus (`lm.corpus.CorpusPlan.split_range`: byte ranges of JSON-lines
files, row ranges of parquet files and datasets), tokenized and packed on its own by whoever captures it
(`ShardSource.sequences`): a task reads and tokenizes its share only, never the whole corpus. Its
sample ids are `index * SAMPLE_ID_STRIDE + j`. With `--max-samples n` the shards are instead contiguous
blocks of the first n sequences of the corpus (`shard_bounds`), which every task tokenizes (n is small).
Capturing a shard = scoring its sequences in batches of `batch_size` (restarting at the shard's start, so
a shard's bytes never depend on which process or driver wrote it) and writing them with one `ShardWriter`.
A shard under its final name is complete and skipped on restart; a killed process loses at most the shard
it was writing. The manifest is written by whichever process sees every shard present
(`finalize_if_complete`), or by `pipeline teacher --finalize`; on a shared filesystem whose clients cache
directory listings (NFS: up to acdirmax, 60 s) the last task may not see every shard yet, so end such a run
with one `--finalize` job after the array.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lm.corpus import CorpusPlan, Sequence, load_range
from lm.loading import load_tokenizer
from storage import (
    Encoding,
    RunSpec,
    ShardReceipt,
    ShardWriter,
    build_manifest,
    load_manifest,
    missing_shards,
    mode_of,
    shard_path,
)
from storage.errors import StorageError

from .capture_modes import score_batch, stored_entries
from .engines.base import Engine

log = logging.getLogger(__name__)

SAMPLE_ID_STRIDE = 1 << 32  # sample ids of shard i: i * stride + j; one shard never holds 2**32 sequences


def shard_bounds(num_sequences: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) blocks of sequence indices, sizes differing by at most one."""
    edges = np.linspace(0, num_sequences, num_shards + 1).round().astype(int)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(num_shards)]


@dataclass
class ShardSource:
    """Where the sequences of shard i come from; small and picklable (a Ray worker gets one).

    plan: the corpus plan (file names, sizes, row counts; no contents). settings: `lm.corpus.corpus_settings`.
    prefix: with --max-samples, the first n sequences of the corpus, cut into blocks by `shard_bounds`.
    The tokenizer is loaded on first use from `tokenizer_dir`, in whichever process reads a shard.
    """

    plan: CorpusPlan | None
    settings: dict
    num_shards: int
    tokenizer_dir: str
    gguf_file: str | None = None
    trust_remote_code: bool = False
    chat_template: str | None = None  # --chat-template's text, replacing the tokenizer's own
    prefix: list[Sequence] | None = None
    _tokenizer: object = field(default=None, repr=False)

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(
                self.tokenizer_dir,
                self.gguf_file,
                trust_remote_code=self.trust_remote_code,
                chat_template=self.chat_template,
            )
        return self._tokenizer

    def sequences(self, index: int) -> list[Sequence]:
        """Shard `index`'s sequences, reading and tokenizing only its range of the corpus. Empty when the
        range holds no trainable sequence (a shard of a run with more shards than documents, say); a
        one-shard run without any is a ValueError, as for the whole corpus."""
        if self.prefix is not None:
            lo, hi = shard_bounds(len(self.prefix), self.num_shards)[index]
            return self.prefix[lo:hi]
        lo, hi = self.plan.split_range(index, self.num_shards)
        res = load_range(
            self.plan,
            self.tokenizer,
            self.settings,
            lo=lo,
            hi=hi,
            first_sample_id=index * SAMPLE_ID_STRIDE,
            allow_empty=self.num_shards > 1,
            where=f"shard {index} of {self.num_shards}" if self.num_shards > 1 else "",
        )
        if not res.sequences:
            log.warning(
                "shard %d of %d: its range of %s holds no trainable sequence; writing an empty shard",
                index,
                self.num_shards,
                self.plan.display,
            )
        return res.sequences


def pending_shards(run_dir: Path, spec: RunSpec, shard_index: int | None) -> tuple[list[int], int]:
    """(this task's shards not yet under their final name, how many this task owns): all shards, or one."""
    mine = list(range(spec.num_shards)) if shard_index is None else [shard_index]
    return [i for i in mine if not shard_path(run_dir, i, spec.num_shards).exists()], len(mine)


@contextmanager
def sigterm_as_exit():
    """SLURM and Kubernetes send SIGTERM on preemption: turn it into SystemExit in the main thread so
    the shard in flight is abandoned cleanly (its tmp file removed), never left half-written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def shard_writer(spec: RunSpec, path: Path) -> ShardWriter:
    """The writer of one shard of the run `spec`, in its encoding and capture mode's layout."""
    mode = mode_of(spec.capture)
    return ShardWriter(
        path,
        fingerprint=spec.fingerprint,
        k=spec.k,
        vocab_size=spec.vocab_size,
        encoding=Encoding.from_dict(spec.encoding),
        variable=mode.variable,
        sampled=mode.sampled,
    )


def write_shard(engine: Engine, spec: RunSpec, path: Path, seqs, batch_size: int, bar) -> ShardReceipt:
    """Score `seqs` and write them as one shard; encoding and zstd run on a background thread so the
    engine never waits on compression. `bar.update(trained tokens)` after each batch."""
    q: queue.Queue = queue.Queue(maxsize=4)
    failure: list[BaseException] = []
    with shard_writer(spec, path) as writer:

        def consume():
            try:
                while (item := q.get()) is not None:
                    for seq, top in item:
                        writer.add(
                            seq.sample_id,
                            seq.input_ids,
                            seq.label_mask,
                            *stored_entries(spec.capture, top, seq.label_mask),
                        )
            except BaseException as e:  # surfaced in the main thread below
                failure.append(e)

        t = threading.Thread(target=consume, name="shard-writer", daemon=True)
        t.start()
        try:
            for start in range(0, len(seqs), batch_size):
                batch = seqs[start : start + batch_size]
                tops = score_batch(engine, spec.capture, spec.k, batch)
                while True:
                    if failure:
                        raise failure[0]
                    try:
                        q.put(list(zip(batch, tops)), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                bar.update(sum(int(s.label_mask.sum()) for s in batch))
        finally:
            # The sentinel only while the writer lives: one that died on a row never drains the queue
            # again, and a blocking put into a full queue would wait forever.
            while t.is_alive():
                try:
                    q.put(None, timeout=0.5)
                    break
                except queue.Full:
                    continue
            t.join()
        if failure:
            raise failure[0]
        return writer.close()


def finalize(run_dir: Path) -> dict:
    """Check every shard is present and consistent, and write manifest.json. Names missing shards."""
    m = build_manifest(run_dir, write=False)
    if m.rows == 0:
        raise ValueError(
            f"{run_dir}: every shard is empty: no range of the corpus holds a trainable sequence "
            f"(empty or invalid rows, or chat rows without assistant turns); check --text-field / --messages-field"
        )
    if _manifest_text(run_dir) != json.dumps(m.to_dict(), sort_keys=True):
        m = build_manifest(run_dir)  # a finished run's manifest is left as it is (its filesystem may be read-only)
    return {
        "run_dir": str(run_dir),
        "rows": m.rows,
        "trained_tokens": m.trained_tokens,
        "bytes": m.bytes,
        "bytes_per_trained_token": m.bytes / max(m.trained_tokens, 1),
        "finalized": True,
    }


def _manifest_text(run_dir: Path) -> str | None:
    """The manifest on disk, canonically serialised; None when it is absent or does not load."""
    try:
        return json.dumps(load_manifest(run_dir).to_dict(), sort_keys=True)
    except (StorageError, OSError):
        return None


def finalize_if_complete(run_dir: Path, spec: RunSpec, summary: dict) -> dict:
    """Write the manifest if this process completed the run; otherwise say which shards are missing."""
    missing = missing_shards(run_dir, spec)
    if missing:
        summary["missing_shards"] = missing
    else:
        summary["run"] = finalize(run_dir)
        summary["finalized"] = True
    return summary


def task_summary(
    run_dir: Path, spec: RunSpec, written: Iterable[dict], *, scoring_s: float, wall_s: float, **extra
) -> dict:
    """What this task wrote, at what rate, before `finalize_if_complete`. `written`: one dict per shard written,
    with the receipt's index, rows, trained_tokens and bytes; `extra` adds driver-specific keys."""
    written = list(written)
    tokens = sum(r["trained_tokens"] for r in written)
    # Scored: every input position the teacher ran over (receipts' `tokens`), the rate a forward pass runs at;
    # trained: the positions that carry labels (less than scored on chat runs, where prompts are not trained).
    scored = sum(r["tokens"] for r in written) if all("tokens" in r for r in written) else None
    size = sum(r["bytes"] for r in written)
    return {
        "run_dir": str(run_dir),
        "shards_written": sorted(r["index"] for r in written),
        "sequences": sum(r["rows"] for r in written),
        "scored_tokens": scored,
        "trained_tokens": tokens,
        "tokens_per_s": scored / scoring_s if scoring_s and scored is not None else None,  # scored tokens / s
        "trained_tokens_per_s": tokens / scoring_s if scoring_s else None,
        "bytes": size,
        "bytes_per_trained_token": size / max(tokens, 1) if written else None,
        "wall_s": wall_s,
        "finalized": False,
        "capture": spec.capture,
        **extra,
    }


def summary_line(s: dict) -> str:
    if s.get("tokens_per_s"):  # scored tokens per second, with the trained ones beside them
        rate = (
            f"{s['scored_tokens']:,} scored tokens at {s['tokens_per_s']:,.0f} tok/s "
            f"({s['trained_tokens']:,} trained, {s['trained_tokens_per_s']:,.0f} trained tok/s)"
        )
    elif s.get("trained_tokens_per_s"):  # a driver whose shards did not report their scored tokens
        rate = f"{s['trained_tokens']:,} trained tokens at {s['trained_tokens_per_s']:,.0f} trained tok/s"
    else:
        rate = f"{s['trained_tokens']:,} trained tokens, nothing to score"
    b = (s.get("run") or s).get("bytes_per_trained_token")
    bpt = f"{b:.1f} B/trained token" if b else "-"
    state = "finalized" if s.get("finalized") else f"waiting for shards {s.get('missing_shards', [])[:8]}"
    cap = s.get("capture")
    mode = mode_of(cap).label(cap) if cap else ""
    return (
        f"teacher: {s['sequences']:,} sequences, {rate}, {bpt}, "
        + (f"capture {mode}, " if mode else "")
        + f"{state} -> {s['run_dir']}"
    )
