"""Stage 1: score a corpus with the frozen teacher once and store its labels as shards.

    pipeline teacher --model PATH_OR_NAME --data corpus.jsonl --out runs/r1 --seq-len 1024

Work split: the corpus is cut into `num_shards` contiguous ranges (of bytes, rows), decided from file sizes
alone; shard i is written by whichever process is given `shard_index=i` (or by this process for every
shard), which reads and tokenizes that range only. The shard is the unit of work (`shards.py`); this is
the local driver. With `--ray`, `ray_capture` scores the pending shards on a Ray cluster instead (one
engine per worker, the same shard files).
"""

from __future__ import annotations

import logging
import time

from tqdm.auto import tqdm

from storage import claim_run_dir, failpoints, shard_path

from .config import TeacherConfig
from .prepare import build_engine, prepare
from .ray_capture import run_ray
from .shards import finalize_if_complete, pending_shards, sigterm_as_exit, task_summary, write_shard

log = logging.getLogger(__name__)

_PREPARED = failpoints.declare("teacher.prepared", "corpus planned and run spec built; nothing written yet")


def run(config: TeacherConfig) -> dict:
    """Capture the shards this process is responsible for; write the manifest if the run is complete."""
    if config.ray:
        return run_ray(config)
    t0 = time.perf_counter()
    spec, source, model_dir, (engine_name, device, dtype) = prepare(config)
    _PREPARED()
    pending, owned = pending_shards(config.out, spec, config.shard_index)
    # The first shard is read before anything is written or the engine is built: a corpus without a
    # trainable position fails with nothing on disk and no model loaded.
    first = source.sequences(pending[0]) if pending else None
    spec = claim_run_dir(config.out, spec)  # the settings on disk: equal, or the same inputs spelled otherwise
    if len(pending) < owned:
        log.info("%d of %d shards already complete; skipping them", owned - len(pending), owned)
    receipts = []
    scoring_s = 0.0
    if pending:
        engine = build_engine(spec, model_dir, engine_name, device, dtype, config.gguf_file, config.vllm_kwargs())
        t_engine = time.perf_counter()
        # One shard's sequences in memory at a time.
        with (
            sigterm_as_exit(),
            tqdm(total=None, unit="tok", unit_scale=True, desc="teacher", dynamic_ncols=True) as bar,
        ):
            try:
                for i in pending:
                    seqs, first = (first if first is not None else source.sequences(i)), None
                    path = shard_path(config.out, i, spec.num_shards)
                    receipts.append(write_shard(engine, spec, path, seqs, config.batch_size, bar))
                    del seqs
            finally:
                if hasattr(engine, "close"):  # the vLLM engine's processes end now, not at interpreter exit
                    engine.close()
        scoring_s = time.perf_counter() - t_engine
    summary = task_summary(
        config.out, spec, [r.to_dict() for r in receipts], scoring_s=scoring_s, wall_s=time.perf_counter() - t0
    )
    return finalize_if_complete(config.out, spec, summary)
