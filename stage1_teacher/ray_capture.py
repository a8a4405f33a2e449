"""Stage 1 on a Ray cluster: score the pending shards with one engine per worker (Ray Data).

    pipeline teacher --model PATH --data corpus.jsonl --out /shared/runs/r1 --num-shards 64 \\
        --ray --ray-address auto --num-workers 8

Without `--ray-address` (and without RAY_ADDRESS) a local Ray instance is started, sized to this
machine; `--ray-address auto` joins the cluster this node belongs to (`ray start --head` / `ray start
--address ...`). The package must be installed on every node (`pip install 'label-anneal[ray]'`).

Design: the unit of work is a shard, not a row
    The driver plans the corpus (`prepare.prepare`: file names, sizes, parquet footers; nothing is
    tokenized) and builds a Ray Dataset with ONE ROW PER PENDING SHARD holding only its `shard_index`.
    `map_batches` runs a callable class on an autoscaling pool of 1..`--num-workers` actors (`num_gpus=1`
    each when the run computes on cuda, else `num_cpus` = CPUs / workers); each actor builds the engine
    once (`prepare.build_engine`) and, per row, reads and tokenizes that shard's range of the corpus itself
    (`shards.ShardSource`), scores it and writes it with `shards.write_shard` into the run directory,
    exactly as the single-process path does. Neither the driver nor the object store ever holds the
    corpus's tokens. The output columns are the shard's receipt (index, rows, trained tokens, bytes,
    sha256, timings), plain numpy. The driver then (re)builds the manifest with `build_manifest`.

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
      skipped; an actor that dies loses only the shard it was writing (Ray restarts it and retries the
      shard; the dead one's tmp file is removed by the next writer of that shard).
    The cost: every worker must see the run directory and the corpus (a shared filesystem: NFS, Lustre,
    a PVC, ...), exactly as the tasks of a SLURM or Kubernetes array do, and the model path must be
    readable from every node. For a single machine this is automatic.

Retries are bounded
    Each attempt at a shard is recorded as a file under `<run>/.attempts/<driver id>/` before the work
    starts. A shard whose worker dies (OOM, segfault, a lost node) is retried on a restarted actor up to
    MAX_ATTEMPTS times in all; the next attempt refuses it with `ShardFailedError` naming the shard, and an
    exception inside a shard (bad data, NaN from the engine) fails it at once. Either ends the run with an
    error naming the shard; the shards already written stay, and a re-run resumes.

Autoscaling
    The actor pool grows from 1 to `--num-workers` as resources appear, so a cluster whose GPU nodes
    start at zero gets GPU workers as the autoscaler adds nodes. Whether actors ask for a GPU follows the
    resolved device (cuda: one GPU each), not the GPUs present when the run starts.

"auto" settings are resolved on the driver, which may have no GPU while the workers do: when the
cluster has GPUs and the driver sees none, `--device auto` means cuda (and so `--dtype auto` bf16);
`--engine auto` still needs vLLM importable on the driver, so pass `--engine vllm` explicitly there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from storage import RunSpec, claim_run_dir, failpoints, receipt_for, shard_path
from storage.atomic import tmp_path

from .config import TeacherConfig
from .prepare import build_engine, prepare
from .shards import ShardSource, finalize_if_complete, pending_shards, sigterm_as_exit, task_summary, write_shard

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # attempts at one shard (each may kill its worker) before the run fails naming it
ATTEMPTS_DIR = ".attempts"

_SHARD_STARTED = failpoints.declare(
    "ray.shard_started", "a Ray worker recorded attempt N at a shard and starts it; fields shard, attempt"
)


class ShardFailedError(RuntimeError):
    """A shard failed on a Ray worker: an exception inside it, or too many attempts that killed the worker."""


# What each worker returns per shard (numpy columns); `written` is False when another process had
# finished the shard in the meantime (then it was only checked, not scored).
_RECEIPT_COLUMNS = (
    "shard_index",
    "written",
    "rows",
    "tokens",  # scored tokens: the summary's tok/s counts them (trained tokens beside them)
    "trained_tokens",
    "bytes",
    "sha256",
    "t_start",
    "t_end",
    "host",
)


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
    """One Ray actor: builds the engine once, then reads, scores and writes whole shards."""

    def __init__(
        self,
        spec: RunSpec,
        source: ShardSource,
        run_dir: str,
        attempts_dir: str,
        model_dir: str,
        engine_name: str,
        device: str,
        dtype: str,
        gguf_file: str | None,
        batch_size: int,
        torch_threads: int | None,
        quiet: bool = True,
        vllm_options: dict | None = None,
    ):
        if quiet:  # the driver shows one bar for the whole run; per-worker loading bars are noise
            hf_logging.disable_progress_bar()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.spec, self.source, self.batch_size = spec, source, batch_size
        self.run_dir, self.attempts_dir = Path(run_dir), Path(attempts_dir)
        self.engine = build_engine(spec, Path(model_dir), engine_name, device, dtype, gguf_file, vllm_options)
        self.host = socket.gethostname()

    def _attempt(self, index: int) -> int:
        """Record one more attempt at shard `index` (a unique file, so workers on any host can count them);
        refuse the shard once MAX_ATTEMPTS earlier attempts ended without it."""
        self.attempts_dir.mkdir(parents=True, exist_ok=True)
        mark = tmp_path(self.attempts_dir / f"shard-{index:05d}")
        mark.write_text(self.host + "\n")
        n = len(list(self.attempts_dir.glob(f"shard-{index:05d}.*")))
        if n > MAX_ATTEMPTS:
            raise ShardFailedError(
                f"shard {index} ({shard_path(self.run_dir, index, self.spec.num_shards).name}) failed "
                f"{n - 1} times, each attempt ending its Ray worker (out of memory? a crash in the engine?); "
                f"giving up on it. The other shards are kept: fix the cause and re-run the same command"
            )
        return n

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {c: [] for c in _RECEIPT_COLUMNS}
        for index in batch["shard_index"]:
            index = int(index)
            path = shard_path(self.run_dir, index, self.spec.num_shards)
            t_start = time.time()
            written = not path.exists()  # False: finished meanwhile by another process (an array task, say)
            if not written:
                receipt = receipt_for(path, self.spec)
            else:
                attempt = self._attempt(index)
                _SHARD_STARTED(shard=index, attempt=attempt)
                try:
                    seqs = self.source.sequences(index)
                    receipt = write_shard(self.engine, self.spec, path, seqs, self.batch_size, _NoBar())
                except Exception as e:  # named here: Ray's wrapping hides which shard it was
                    raise ShardFailedError(f"shard {index} ({path.name}) failed: {type(e).__name__}: {e}") from e
            for c, v in (
                ("shard_index", index),
                ("written", written),
                ("rows", receipt.rows),
                ("tokens", receipt.tokens),
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


def _plan_workers(ray, config: TeacherConfig, device: str, pending: int) -> dict:
    """Actor resources and pool size: a GPU each when the run computes on cuda (whether or not the cluster
    has GPU nodes yet: an autoscaler adds them on demand), else an equal share of the cluster's CPUs."""
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    workers = min(config.num_workers, pending)
    if device.startswith("cuda"):
        if gpus < workers:
            log.info(
                "--num-workers %d and the cluster has %d GPUs now: the pool grows as GPU nodes join", workers, gpus
            )
        return {"workers": workers, "num_gpus": 1, "num_cpus": None, "torch_threads": None, "gpus": gpus, "cpus": cpus}
    if workers > cpus:
        log.warning("--num-workers %d but the cluster has %d CPUs: using %d workers", workers, cpus, cpus)
        workers = cpus
    per = max(1, cpus // workers)
    return {"workers": workers, "num_gpus": None, "num_cpus": per, "torch_threads": per, "gpus": 0, "cpus": cpus}


def _failed_shards(attempts_dir: Path, run_dir: Path, spec: RunSpec) -> list[int]:
    """Shards that were attempted in this run and are still missing."""
    tried = {int(p.name[6:11]) for p in attempts_dir.glob("shard-*")} if attempts_dir.is_dir() else set()
    return sorted(i for i in tried if not shard_path(run_dir, i, spec.num_shards).exists())


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
        spec, source, model_dir, (engine_name, device, dtype) = prepare(config)
        run_dir = config.out.resolve()
        spec = claim_run_dir(run_dir, spec)  # the settings on disk (equal, or the same inputs spelled otherwise)
        pending, owned = pending_shards(run_dir, spec, config.shard_index)
        if len(pending) < owned:
            log.info("%d of %d shards already complete; skipping them", owned - len(pending), owned)
        results: list[dict] = []
        plan = None
        attempts_dir = run_dir / ATTEMPTS_DIR / tmp_path(Path("run")).name[: -len(".tmp")]
        if pending:
            plan = _plan_workers(ray, config, device, len(pending))
            ds = ray.data.from_items([{"shard_index": i} for i in pending]).map_batches(
                _ShardScorer,
                batch_size=1,  # one shard per call: the unit of work and of retry
                batch_format="numpy",
                # one shard in flight per actor, so a slow shard never holds another one hostage in a queue
                compute=ray.data.ActorPoolStrategy(
                    min_size=1, max_size=plan["workers"], max_tasks_in_flight_per_actor=1
                ),
                fn_constructor_kwargs=dict(
                    spec=spec,
                    source=source,
                    run_dir=str(run_dir),
                    attempts_dir=str(attempts_dir),
                    model_dir=str(Path(model_dir).resolve()),
                    engine_name=engine_name,
                    device=device,
                    dtype=dtype,
                    gguf_file=config.gguf_file,
                    batch_size=config.batch_size,
                    torch_threads=plan["torch_threads"],
                    quiet=quiet,
                    vllm_options=config.vllm_kwargs(),
                ),
                # Bounded: a restarted actor retries the shard it died on; `_ShardScorer._attempt` ends it.
                max_restarts=MAX_ATTEMPTS,
                max_task_retries=MAX_ATTEMPTS,
                **({"num_gpus": 1} if plan["num_gpus"] else {"num_cpus": plan["num_cpus"]}),
            )
            log.info(
                "scoring %d shards with up to %d Ray workers (%s)",
                len(pending),
                plan["workers"],
                f"1 GPU each, {plan['gpus']} now"
                if plan["num_gpus"]
                else f"{plan['num_cpus']} CPUs each of {plan['cpus']}",
            )
            try:
                with (
                    sigterm_as_exit(),
                    tqdm(total=None, unit="tok", unit_scale=True, desc="teacher (ray)", dynamic_ncols=True) as bar,
                ):
                    for row in ds.iter_rows():
                        results.append(
                            {c: row[c].item() if hasattr(row[c], "item") else row[c] for c in _RECEIPT_COLUMNS}
                        )
                        bar.update(results[-1]["trained_tokens"])
            except Exception as e:
                failed = _failed_shards(attempts_dir, run_dir, spec)
                cause = str(e).strip().splitlines()
                named = next(
                    (line for line in reversed(cause) if "ShardFailedError" in line), cause[-1] if cause else ""
                )
                raise ShardFailedError(f"--ray: the run stopped; shard(s) {failed} failed. {named.strip()}") from e
            finally:
                shutil.rmtree(attempts_dir, ignore_errors=True)
                with contextlib.suppress(OSError):
                    attempts_dir.parent.rmdir()  # only when no other driver's attempts are in it
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
