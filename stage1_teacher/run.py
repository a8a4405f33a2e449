"""Stage 1: score a corpus with the frozen teacher once and store its top-k as shards.

    pipeline teacher --model PATH_OR_NAME --data corpus.jsonl --out runs/r1 --top-k 32 --seq-len 1024

Work split: the corpus's sequences are cut into `num_shards` contiguous blocks by index; shard i
is written by whichever process is given `shard_index=i` (or by this process for every shard).
A shard under its final name is complete and skipped on restart; a killed process loses at most
the shard it was writing. The manifest is written by whichever process sees every shard present,
or by `pipeline teacher --finalize RUN_DIR`. With `--ray`, `ray_capture` scores the pending shards
on a Ray cluster instead (one engine per worker, the same shard files).
"""
from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from storage import (Encoding, IncompleteRunError, RunSpec, ShardWriter, build_manifest, claim_run_dir,
                     load_run_spec, missing_shards, shard_path)
from storage import failpoints
from storage.layout import FORMAT_VERSION

from .config import TeacherConfig
from .capture_modes import apply_top_p, distinct_draws, draw_uniforms, hybrid_entries, stored_width
from .teacher_identity import resolve_model_dir, teacher_identity

log = logging.getLogger(__name__)

_PREPARED = failpoints.declare("teacher.prepared", "corpus tokenized and run spec built; nothing written yet")


def shard_bounds(num_sequences: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) blocks of sequence indices, sizes differing by at most one."""
    edges = np.linspace(0, num_sequences, num_shards + 1).round().astype(int)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(num_shards)]


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


def _resolve_engine_and_dtype(config: TeacherConfig) -> tuple[str, str, str]:
    import torch

    from .engines.base import resolve_engine_name

    engine = resolve_engine_name(config.engine)
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if (engine == "vllm" and torch.cuda.is_available()) or device.startswith("cuda") else "float32"
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    return engine, device, dtype


def _load_tokenizer(model_dir: Path, gguf_file: str | None):
    from transformers import AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(model_dir, **kw)


def _model_limits(model_dir: Path, gguf_file: str | None) -> tuple[int, int | None]:
    from transformers import AutoConfig

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    cfg = AutoConfig.from_pretrained(model_dir, **kw)
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(cfg.vocab_size), getattr(cfg, "max_position_embeddings", None)


def prepare(config: TeacherConfig):
    """Tokenize the corpus and build the run spec (no model weights loaded)."""
    from .corpus import load_sequences
    from .tokenizer_info import tokenizer_fingerprint

    model_dir = resolve_model_dir(config.model)
    identity = teacher_identity(model_dir, name_or_path=config.model, gguf_file=config.gguf_file)
    engine, device, dtype = _resolve_engine_and_dtype(config)
    mode = config.resolved_capture(engine)
    if mode != config.capture:
        log.info("--capture auto: %s with the %s engine", mode, engine)
    vocab_size, max_pos = _model_limits(model_dir, config.gguf_file)
    problems = []
    if config.top_k > vocab_size:
        problems.append(f"--top-k {config.top_k} is larger than the teacher's vocabulary ({vocab_size})")
    elif mode == "hybrid" and config.top_k + config.draws > vocab_size:
        problems.append(f"--top-k {config.top_k} + --draws {config.draws} exceed the teacher's vocabulary ({vocab_size})")
    if max_pos is not None and config.seq_len > max_pos:
        problems.append(f"--seq-len {config.seq_len} exceeds the teacher's context ({max_pos} positions)")
    if problems:
        raise ValueError("; ".join(problems))
    tokenizer = _load_tokenizer(model_dir, config.gguf_file)
    corpus = load_sequences(config.data, tokenizer, seq_len=config.seq_len, text_field=config.text_field,
                            messages_field=config.messages_field, train_on_prompt=config.train_on_prompt,
                            max_samples=config.max_samples, pack=config.pack, split=config.split)
    n = corpus.num_sequences
    if config.num_shards > n:
        raise ValueError(f"--num-shards {config.num_shards} exceeds the {n} sequences of {config.data}: "
                         f"every shard needs at least one sequence; use --num-shards <= {n}")
    if mode in ("sample", "hybrid") and engine != "hf":
        raise ValueError(f"--capture {mode} needs the hf engine (vLLM returns only the top-k); pass --engine hf")
    width = stored_width(mode, config.top_k, config.draws)
    capture = {"mode": mode, "engine": engine, "dtype": dtype}
    if mode == "topp":
        capture |= {"top_p": config.top_p, "min_k": config.min_k, "max_k": config.top_k}
    elif mode in ("sample", "hybrid"):
        capture |= {"draws": config.draws, "seed": config.seed, "head_k": config.top_k if mode == "hybrid" else 0}
    encoding = Encoding.parse(config.encoding)
    if mode in ("sample", "hybrid") and encoding.ids == "delta":
        raise ValueError("--capture sample/hybrid stores draw counts in entry order: use ids=plain in --encoding")
    spec = RunSpec(
        teacher={**identity, "dtype": dtype},
        tokenizer=tokenizer_fingerprint(tokenizer),
        vocab_size=vocab_size,
        k=width,
        encoding=encoding.to_dict(),
        capture=capture,
        corpus={"fingerprint": corpus.fingerprint, "source": str(config.data), **corpus.settings},
        seq_len=config.seq_len,
        num_shards=config.num_shards,
        num_sequences=n,
        format_version=FORMAT_VERSION,
    )
    return spec, corpus, model_dir, (engine, device, dtype)


def build_engine(spec: RunSpec, model_dir: Path, engine_name: str, device: str, dtype: str, gguf_file: str | None):
    """The engine that scores this run's shards (in this process, or once per Ray worker)."""
    from .engines.base import make_engine

    engine = make_engine(engine_name, str(model_dir), dtype=dtype, device=device, gguf_file=gguf_file,
                         **({"max_model_len": spec.seq_len, "max_logprobs": spec.k} if engine_name == "vllm" else {}))
    if engine.vocab_size != spec.vocab_size:
        raise ValueError(f"engine reports vocabulary {engine.vocab_size}, the model config {spec.vocab_size}")
    return engine


def _write_shard(engine, spec: RunSpec, path: Path, seqs, batch_size: int, bar) -> object:
    """Score `seqs` and write them as one shard; encoding and zstd run on a background thread so the
    engine never waits on compression."""
    enc = Encoding.from_dict(spec.encoding)
    q: queue.Queue = queue.Queue(maxsize=4)
    failure: list[BaseException] = []

    mode = spec.capture.get("mode", "topk")
    with ShardWriter(path, fingerprint=spec.fingerprint, k=spec.k, vocab_size=spec.vocab_size, encoding=enc,
                     variable=mode != "topk", sampled=mode in ("sample", "hybrid")) as writer:
        def consume():
            try:
                while (item := q.get()) is not None:
                    for seq, top in item:
                        writer.add(seq.sample_id, seq.input_ids, seq.label_mask, *_stored(spec.capture, top, seq.label_mask))
            except BaseException as e:  # surfaced in the main thread below
                failure.append(e)

        t = threading.Thread(target=consume, name="shard-writer", daemon=True)
        t.start()
        try:
            for start in range(0, len(seqs), batch_size):
                batch = seqs[start:start + batch_size]
                tops = _score(engine, spec, batch)
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


def _score(engine, spec: RunSpec, batch) -> list:
    cap = spec.capture
    mode = cap.get("mode", "topk")
    if mode in ("topk", "topp"):
        return engine.score([s.input_ids for s in batch], spec.k)
    uniforms = [draw_uniforms(cap["seed"], s.sample_id, len(s.input_ids) - 1, cap["draws"]) for s in batch]
    head = max(cap["head_k"], 1)  # sample mode needs no head; the engine's top-1 is simply ignored
    return engine.score([s.input_ids for s in batch], head, uniforms=uniforms, tail_only=mode == "hybrid")


def _stored(capture: dict, top, m):
    """(ids, logprobs, tail, sample_counts) of one sequence's trained positions, in the capture's layout."""
    mode = capture.get("mode", "topk")
    if mode == "topk":
        return top.ids[m], top.logprobs[m], top.tail_logprob[m], None
    if mode == "topp":
        return (*apply_top_p(top.ids[m], top.logprobs[m], top.tail_logprob[m], capture["top_p"], capture["min_k"]), None)
    if mode == "sample":
        ids, lps, counts = distinct_draws(top.sample_ids[m], top.sample_logprobs[m], capture["draws"])
        from storage.codec import tail_from_topk

        return ids, lps, tail_from_topk(lps), counts
    return hybrid_entries(top.ids[m], top.logprobs[m], top.tail_logprob[m], top.sample_ids[m],
                          top.sample_logprobs[m], capture["draws"])


def finish(run_dir: Path, spec: RunSpec, summary: dict) -> dict:
    """Write the manifest if this process completed the run; otherwise say which shards are missing."""
    missing = missing_shards(run_dir, spec)
    if missing:
        summary["missing_shards"] = missing
    else:
        summary["run"] = finalize(run_dir)
        summary["finalized"] = True
    return summary


def finalize(run_dir: Path) -> dict:
    """Check every shard is present and consistent, and write manifest.json. Names missing shards."""
    m = build_manifest(run_dir)
    return {"run_dir": str(run_dir), "rows": m.rows, "trained_tokens": m.trained_tokens, "bytes": m.bytes,
            "bytes_per_trained_token": m.bytes / max(m.trained_tokens, 1), "finalized": True}


def run(config: TeacherConfig) -> dict:
    """Capture the shards this process is responsible for; write the manifest if the run is complete."""
    from tqdm.auto import tqdm

    if config.ray:
        from .ray_capture import run_ray

        return run_ray(config)
    t0 = time.perf_counter()
    spec, corpus, model_dir, (engine_name, device, dtype) = prepare(config)
    _PREPARED()
    claim_run_dir(config.out, spec)
    mine = list(range(spec.num_shards)) if config.shard_index is None else [config.shard_index]
    pending = [i for i in mine if not shard_path(config.out, i, spec.num_shards).exists()]
    if len(pending) < len(mine):
        log.info("%d of %d shards already complete; skipping them", len(mine) - len(pending), len(mine))
    bounds = shard_bounds(spec.num_sequences, spec.num_shards)
    receipts = []
    scored_tokens = 0
    if pending:
        engine = build_engine(spec, model_dir, engine_name, device, dtype, config.gguf_file)
        todo = sum(int(s.label_mask.sum()) for i in pending for s in corpus.sequences[slice(*bounds[i])])
        t_engine = time.perf_counter()
        with sigterm_as_exit(), tqdm(total=todo, unit="tok", unit_scale=True, desc="teacher", dynamic_ncols=True) as bar:
            for i in pending:
                seqs = corpus.sequences[slice(*bounds[i])]
                receipts.append(_write_shard(engine, spec, shard_path(config.out, i, spec.num_shards), seqs,
                                             config.batch_size, bar))
        scored_tokens = todo
        elapsed = time.perf_counter() - t_engine
    else:
        elapsed = 0.0
    summary = {"run_dir": str(config.out), "shards_written": [r.index for r in receipts],
               "sequences": sum(r.rows for r in receipts), "trained_tokens": scored_tokens,
               "tokens_per_s": scored_tokens / elapsed if elapsed else None,
               "bytes": sum(r.bytes for r in receipts),
               "bytes_per_trained_token": sum(r.bytes for r in receipts) / max(scored_tokens, 1) if receipts else None,
               "wall_s": time.perf_counter() - t0, "finalized": False, "capture": spec.capture}
    return finish(config.out, spec, summary)


def summary_line(s: dict) -> str:
    rate = f"{s['tokens_per_s']:,.0f} tok/s" if s.get("tokens_per_s") else "nothing to score"
    b = (s.get("run") or s).get("bytes_per_trained_token")
    bpt = f"{b:.1f} B/trained token" if b else "-"
    state = "finalized" if s.get("finalized") else f"waiting for shards {s.get('missing_shards', [])[:8]}"
    cap = s.get("capture") or {}
    mode = cap.get("mode", "")
    mode = f"{mode} ({cap['draws']} draws)" if mode == "sample" else mode
    return (f"teacher: {s['sequences']:,} sequences, {s['trained_tokens']:,} trained tokens, {rate}, {bpt}, "
            + (f"capture {mode}, " if mode else "") + f"{state} -> {s['run_dir']}")
