"""Stage 1 on a Ray cluster: score the pending shards with one engine per worker (Ray Data).

    pipeline teacher --model PATH --data corpus.jsonl --out /shared/runs/r1 --num-shards 64 \\
        --ray --ray-address auto --num-workers 8

Without `--ray-address` (and without RAY_ADDRESS) a local Ray instance is started, sized to this
machine; `--ray-address auto` joins the cluster this node belongs to (`ray start --head` / `ray start
--address ...`). The package must be installed on every node (`pip install 'label-anneal[ray]'`).

Design: the unit of work is a shard, not a row
    The driver tokenizes the corpus once (`prepare.prepare`, as every process of a static split does) and
    builds a Ray Dataset with ONE ROW PER PENDING SHARD, whose columns are numpy arrays: `shard_index`
    (int64), and the shard's sequences as ragged columns (`sample_id` int64[n], `seq_len` int32[n],
    `input_ids` int32[sum T], `label_mask` bool[sum T-1]). `map_batches` runs a callable class with a
    fixed pool of `--num-workers` actors (`num_gpus=1` each when the cluster has GPUs, else `num_cpus`
    = CPUs / workers); each actor builds the engine once (`prepare.build_engine`) and, per row, scores the
    shard and writes it with `shards.write_shard` into the run directory, exactly as the single-process
    path does. The output columns are the shard's receipt (index, rows, trained tokens, bytes, sha256,
    timings), again plain numpy. The driver then (re)builds the manifest with `build_manifest`.

    Why not stream rows of top-k back to the driver and write there (the other obvious design)?
    * Identical bytes. A shard's bytes depend on its values, and the hf engine's values depend (in the
      last bits) on how sequences are batched: padding changes the rounding (on the tiny test model a
      sequence scored alone and beside a longer one differs by 5e-7 in log-prob). Ray Data
      re-bundles blocks freely, so a row-level pipeline cannot promise the single-process batching
      (batches of `--batch-size` restarting at each shard boundary); calling the very same
      `write_shard` per shard does, and the equality test (`tests/ray`) checks the sha256 of every shard.
    * Real parallelism at scale. Encoding, zstd and checksums run on the workers, next to the engines;
      a driver-side writer would funnel every top-k through one process (and the object store) and
      become the bottleneck long before the GPUs are busy.
    * The same resume and failure story as SLURM arrays: a shard under its final name is complete and
      skipped; an actor that dies loses only the shard it was writing (Ray Data retries it on another
      actor; the dead one's tmp file is removed by the next writer of that shard).
    The cost: every worker must see the run directory (a shared filesystem: NFS, Lustre, a PVC, ...),
    exactly as the tasks of a SLURM or Kubernetes array do, and the model path must be readable from
    every node. For a single machine this is automatic.

"auto" settings are resolved on the driver, which may have no GPU while the workers do: when the
cluster has GPUs and the driver sees none, `--device auto` means cuda (and so `--dtype auto` bf16);
`--engine auto` still needs vLLM importable on the driver, so pass `--engine vllm` explicitly there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from lm.corpus import Sequence
from storage import RunSpec, claim_run_dir, receipt_for, shard_path

from .config import TeacherConfig
from .prepare import build_engine, prepare
from .shards import finalize_if_complete, pending_shards, shard_bounds, sigterm_as_exit, task_summary, write_shard

log = logging.getLogger(__name__)

# What each worker returns per shard (numpy columns); `written` is False when another process had
# finished the shard in the meantime (then it was only checked, not scored).
_RECEIPT_COLUMNS = ("shard_index", "written", "rows", "trained_tokens", "bytes", "sha256", "t_start", "t_end", "host")


def _import_ray():
    try:  # optional extra [ray]: only --ray needs it
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"--ray needs Ray Data ({e}): pip install 'label-anneal[ray]' (or `make .venv/.ray-installed`); "
            f"without Ray, split the work with --num-shards/--shard-index (SLURM or Kubernetes arrays)"
        ) from e
    return ray


def _machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _connect(ray, address: str | None, quiet: bool) -> bool:
    """ray.init unless already connected; returns whether this call started the connection."""
    if ray.is_initialized():
        return False
    kw = {"include_dashboard": False, "logging_level": logging.ERROR if quiet else logging.INFO}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        kw["num_cpus"] = _machine_cpus()  # a local instance for this machine only
    ray.init(address=address, **kw)
    return True


class _ShardScorer:
    """One Ray actor: builds the engine once, then scores and writes whole shards."""

    def __init__(
        self,
        spec: RunSpec,
        run_dir: str,
        model_dir: str,
        engine_name: str,
        device: str,
        dtype: str,
        gguf_file: str | None,
        batch_size: int,
        torch_threads: int | None,
        quiet: bool = True,
    ):
        if quiet:  # the driver shows one bar for the whole run; per-worker loading bars are noise
            hf_logging.disable_progress_bar()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.spec, self.run_dir, self.batch_size = spec, Path(run_dir), batch_size
        self.engine = build_engine(spec, Path(model_dir), engine_name, device, dtype, gguf_file)
        self.host = socket.gethostname()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {c: [] for c in _RECEIPT_COLUMNS}
        for j, index in enumerate(batch["shard_index"]):
            index = int(index)
            path = shard_path(self.run_dir, index, self.spec.num_shards)
            t_start = time.time()
            written = not path.exists()  # False: finished meanwhile by another process (an array task, say)
            if not written:
                receipt = receipt_for(path, self.spec)
            else:
                receipt = write_shard(self.engine, self.spec, path, _unpack(batch, j), self.batch_size, _NoBar())
            for c, v in (
                ("shard_index", index),
                ("written", written),
                ("rows", receipt.rows),
                ("trained_tokens", receipt.trained_tokens),
                ("bytes", receipt.bytes),
                ("sha256", receipt.sha256),
                ("t_start", t_start),
                ("t_end", time.time()),
                ("host", self.host),
            ):
                out[c].append(v)
        return {c: np.asarray(v) for c, v in out.items()}


class _NoBar:
    """Workers report per shard to the driver's bar, not per batch."""

    def update(self, n: int) -> None:
        pass


def _pack(index: int, seqs) -> pa.Table:
    """One shard's sequences as a one-row table of ragged (large_list) columns."""

    def ragged(values: np.ndarray) -> pa.Array:
        return pa.LargeListArray.from_arrays(pa.array([0, len(values)], pa.int64()), pa.array(values))

    return pa.table(
        {
            "shard_index": pa.array([index], pa.int64()),
            "sample_id": ragged(np.array([s.sample_id for s in seqs], dtype=np.int64)),
            "seq_len": ragged(np.array([len(s.input_ids) for s in seqs], dtype=np.int32)),
            "input_ids": ragged(np.concatenate([s.input_ids for s in seqs]).astype(np.int32, copy=False)),
            "label_mask": ragged(np.concatenate([s.label_mask for s in seqs]).astype(bool, copy=False)),
        }
    )


def _unpack(batch: dict[str, np.ndarray], j: int) -> list[Sequence]:
    """Row j of a numpy batch back into the shard's `Sequence`s (views, no copies)."""
    lengths = np.asarray(batch["seq_len"][j], dtype=np.int64)
    ids, mask = np.asarray(batch["input_ids"][j]), np.asarray(batch["label_mask"][j])
    id_off = np.concatenate([[0], np.cumsum(lengths)])
    mask_off = np.concatenate([[0], np.cumsum(lengths - 1)])
    return [
        Sequence(int(sid), ids[id_off[i] : id_off[i + 1]], mask[mask_off[i] : mask_off[i + 1]])
        for i, sid in enumerate(np.asarray(batch["sample_id"][j]))
    ]


def _plan_workers(ray, config: TeacherConfig, pending: int) -> dict:
    """Actor resources: a GPU each when the cluster has GPUs, else an equal share of its CPUs."""
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    workers = min(config.num_workers, pending)
    if gpus:
        if workers > gpus:
            log.warning("--num-workers %d but the cluster has %d GPUs: using %d workers", workers, gpus, gpus)
            workers = gpus
        return {"workers": workers, "num_gpus": 1, "num_cpus": None, "torch_threads": None, "gpus": gpus, "cpus": cpus}
    if workers > cpus:
        log.warning("--num-workers %d but the cluster has %d CPUs: using %d workers", workers, cpus, cpus)
        workers = cpus
    per = max(1, cpus // workers)
    return {"workers": workers, "num_gpus": None, "num_cpus": per, "torch_threads": per, "gpus": 0, "cpus": cpus}


def run_ray(config: TeacherConfig) -> dict:
    """`run(config)` with `config.ray`: the same run directory, shards and manifest, scored by Ray workers."""
    t0 = time.perf_counter()
    ray = _import_ray()
    quiet = log.getEffectiveLevel() > logging.INFO
    started = _connect(ray, config.ray_address, quiet)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = not quiet
        ctx.print_on_execution_start = not quiet
        if quiet:  # (Ray Data warns that its bars are off, and logs its plan at INFO)
            logging.getLogger("ray.data").setLevel(logging.ERROR)
        if config.device == "auto" and not torch.cuda.is_available() and ray.cluster_resources().get("GPU", 0) > 0:
            log.info("the Ray cluster has GPUs, this driver none: --device auto means cuda on the workers")
            config = dataclasses.replace(config, device="cuda")
        spec, corpus, model_dir, (engine_name, device, dtype) = prepare(config)
        run_dir = config.out.resolve()
        claim_run_dir(run_dir, spec)
        pending, owned = pending_shards(run_dir, spec, config.shard_index)
        if len(pending) < owned:
            log.info("%d of %d shards already complete; skipping them", owned - len(pending), owned)
        bounds = shard_bounds(spec.num_sequences, spec.num_shards)
        results: list[dict] = []
        plan = None
        if pending:
            plan = _plan_workers(ray, config, len(pending))
            todo = sum(int(s.label_mask.sum()) for i in pending for s in corpus.sequences[slice(*bounds[i])])
            blocks = [_pack(i, corpus.sequences[slice(*bounds[i])]) for i in pending]
            del corpus  # the blocks hold the sequences now
            ds = ray.data.from_arrow(blocks).map_batches(
                _ShardScorer,
                batch_size=1,  # one shard per call: the unit of work and of retry
                batch_format="numpy",
                # one shard in flight per actor, so a slow shard never holds another one hostage in a queue
                compute=ray.data.ActorPoolStrategy(size=plan["workers"], max_tasks_in_flight_per_actor=1),
                fn_constructor_kwargs=dict(
                    spec=spec,
                    run_dir=str(run_dir),
                    model_dir=str(Path(model_dir).resolve()),
                    engine_name=engine_name,
                    device=device,
                    dtype=dtype,
                    gguf_file=config.gguf_file,
                    batch_size=config.batch_size,
                    torch_threads=plan["torch_threads"],
                    quiet=quiet,
                ),
                **({"num_gpus": 1} if plan["num_gpus"] else {"num_cpus": plan["num_cpus"]}),
            )
            log.info(
                "scoring %d shards with %d Ray workers (%s)",
                len(pending),
                plan["workers"],
                f"1 GPU each of {plan['gpus']}" if plan["gpus"] else f"{plan['num_cpus']} CPUs each of {plan['cpus']}",
            )
            with (
                sigterm_as_exit(),
                tqdm(total=todo, unit="tok", unit_scale=True, desc="teacher (ray)", dynamic_ncols=True) as bar,
            ):
                for row in ds.iter_rows():
                    results.append({c: row[c].item() if hasattr(row[c], "item") else row[c] for c in _RECEIPT_COLUMNS})
                    bar.update(results[-1]["trained_tokens"])
    finally:
        if started:
            ray.shutdown()
    results = [r for r in results if r["written"]]
    # cluster throughput: first shard started to last shard finished (engine start-up excluded)
    span = (max(r["t_end"] for r in results) - min(r["t_start"] for r in results)) if results else 0.0
    summary = task_summary(
        config.out,
        spec,
        [{**r, "index": r["shard_index"]} for r in results],
        scoring_s=span,
        wall_s=time.perf_counter() - t0,
        ray={
            "workers": plan["workers"] if plan else 0,
            "gpus": plan["gpus"] if plan else 0,
            "hosts": sorted({r["host"] for r in results}),
        },
    )
    return finalize_if_complete(config.out, spec, summary)
