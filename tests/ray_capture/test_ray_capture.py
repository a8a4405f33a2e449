"""`pipeline teacher --ray` on a local Ray instance: the same shards, byte for byte, as one process; resume.

    make test-ray        # or: .venv/bin/python -m pytest -m ray tests/ray -q

Each `--ray` run starts (and stops) its own local Ray instance in a real subprocess, as a user would;
most of the time is Ray starting up (~10 s) and the workers importing torch. Worker deaths are injected
with failpoints (`ray.shard_started{shard=N,attempt=A}=kill`), never by timing.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray.data", reason="needs the [ray] extra: make .venv/.ray-installed")

from e2e_helpers import assert_same_run, cli, spawn  # noqa: E402

from stage1_teacher.ray_capture import MAX_ATTEMPTS  # noqa: E402
from storage.failpoints import ENV as FAILPOINTS_ENV  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

NUM_SHARDS = 4


def _args(tiny_model_dir, tiny_corpus_dir):
    return [
        "--model",
        tiny_model_dir,
        "--data",
        tiny_corpus_dir / "text.jsonl",
        "--capture",
        "topk",
        "--top-k",
        8,
        "--seq-len",
        32,
        "--num-shards",
        NUM_SHARDS,
        "--batch-size",
        3,
        "--encoding",
        "exact",
        "--engine",
        "hf",
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, tiny_corpus_dir):
    """The single-process run every Ray run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    cli("teacher", *_args(tiny_model_dir, tiny_corpus_dir), "--out", out)
    return out


def _ray_teacher(*args, verbose: bool = False) -> str:
    p = spawn(*(["-v"] if verbose else []), "teacher", *args, "--ray", "--num-workers", 2)
    try:
        out, _ = p.communicate(timeout=240)
    finally:
        p.kill()
    assert p.returncode == 0, out
    return out


def test_ray_run_equals_single_process(tmp_path, reference, tiny_model_dir, tiny_corpus_dir):
    out = tmp_path / "ray"
    log = _ray_teacher(*_args(tiny_model_dir, tiny_corpus_dir), "--out", out)
    assert "finalized" in log and "B/trained token" in log
    assert sorted(p.name for p in (out / "shards").glob("*.parquet")) == [
        f"part-{i:05d}-of-{NUM_SHARDS:05d}.parquet" for i in range(NUM_SHARDS)
    ]
    assert not list((out / "shards").glob("*.tmp")), "no leftovers"
    assert_same_run(out, reference)


def test_ray_resumes_and_scores_only_missing_shards(tmp_path, reference, tiny_model_dir, tiny_corpus_dir):
    out = tmp_path / "resumed"
    args = _args(tiny_model_dir, tiny_corpus_dir)
    cli("teacher", *args, "--out", out, "--shard-index", 0)  # one "array task" finished before Ray took over
    first = out / "shards" / f"part-00000-of-{NUM_SHARDS:05d}.parquet"
    before = first.stat().st_mtime_ns
    assert not (out / "manifest.json").exists()

    log = _ray_teacher(*args, "--out", out, verbose=True)  # -v: the driver logs what it skips
    assert f"1 of {NUM_SHARDS} shards already complete" in log
    assert f"scoring {NUM_SHARDS - 1} shards with up to 2 Ray workers" in log
    assert first.stat().st_mtime_ns == before, "the finished shard is skipped, not rewritten"
    assert (out / "manifest.json").exists()
    info = json.loads((out / "manifest.json").read_text())
    assert [s["index"] for s in info["shards"]] == list(range(NUM_SHARDS))
    assert_same_run(out, reference)


def _ray_run(*args, failpoints: str, workers: int = 2):
    """(returncode, output) of a `--ray` run whose workers act on `failpoints` (storage/failpoints.py)."""
    p = spawn("-v", "teacher", *args, "--ray", "--num-workers", workers, env={FAILPOINTS_ENV: failpoints})
    try:
        out, _ = p.communicate(timeout=240)
    finally:
        p.kill()
    return p.returncode, out


def test_a_killed_worker_is_replaced_and_the_run_equals_single_process(
    tmp_path, reference, tiny_model_dir, tiny_corpus_dir
):
    """Shard 1's first attempt SIGKILLs its worker (a crash, an OOM kill): Ray restarts the actor, the
    second attempt writes the shard, and the run is byte-identical to one process."""
    out = tmp_path / "killed"
    rc, log = _ray_run(
        *_args(tiny_model_dir, tiny_corpus_dir), "--out", out, failpoints="ray.shard_started{shard=1,attempt=1}=kill"
    )
    assert rc == 0, log
    assert "failpoint ray.shard_started{shard=1, attempt=1}: kill" in log, "the worker really died"
    assert_same_run(out, reference)
    assert not (out / ".attempts").exists(), "the attempt records are removed with the run's driver"


def test_a_shard_that_always_kills_its_worker_ends_the_run_naming_it(tmp_path, tiny_model_dir, tiny_corpus_dir):
    """Retries are bounded: every attempt at shard 2 kills its worker; after MAX_ATTEMPTS the run fails with
    an error naming shard 2, the other shards are written, and nothing is finalized."""
    out = tmp_path / "poison"
    rc, log = _ray_run(
        *_args(tiny_model_dir, tiny_corpus_dir), "--out", out, failpoints="ray.shard_started{shard=2}=kill", workers=1
    )
    assert rc != 0, log
    assert "shard(s) [2] failed" in log and f"failed {MAX_ATTEMPTS} times" in log, log[-3000:]
    assert "Traceback" not in log.split("shard(s) [2] failed")[-1]
    done = sorted(p.name for p in (out / "shards").glob("*.parquet"))
    assert f"part-00002-of-{NUM_SHARDS:05d}.parquet" not in done and not (out / "manifest.json").exists()


def test_an_exception_inside_a_shard_ends_the_run_at_once_naming_it(tmp_path, tiny_model_dir, tiny_corpus_dir):
    """A deterministic error inside a shard (here: a line of the corpus that is not JSON, in the range of the
    last shard) is not retried: the run fails at once with an error naming the shard and the cause."""
    data = tmp_path / "bad.jsonl"
    # 3 copies (120 rows): the driver's look at the first 100 rows for the column does not reach the bad line.
    data.write_text((tiny_corpus_dir / "text.jsonl").read_text() * 3 + "{not json\n")
    args = _args(tiny_model_dir, tiny_corpus_dir)
    args[args.index("--data") + 1] = data
    rc, log = _ray_run(*args, "--out", tmp_path / "run", failpoints="", workers=1)
    assert rc != 0, log
    assert f"shard(s) [{NUM_SHARDS - 1}] failed" in log and "not valid JSON" in log, log[-3000:]


def test_gpu_workers_are_planned_for_a_cluster_whose_gpu_nodes_start_at_zero():
    """An autoscaling cluster may have no GPU node yet: with --device cuda the actors still ask for a GPU
    each (the autoscaler adds nodes for them) and the pool may grow to --num-workers; on CPU they share the
    CPUs present."""
    from types import SimpleNamespace

    from stage1_teacher.ray_capture import _plan_workers

    fake = SimpleNamespace(cluster_resources=lambda: {"CPU": 4.0})
    cfg = SimpleNamespace(num_workers=8)
    gpu = _plan_workers(fake, cfg, "cuda", pending=64)
    assert gpu["num_gpus"] == 1 and gpu["workers"] == 8 and gpu["gpus"] == 0
    assert _plan_workers(fake, cfg, "cuda", pending=3)["workers"] == 3, "never more actors than shards"
    cpu = _plan_workers(fake, SimpleNamespace(num_workers=2), "cpu", pending=64)
    assert cpu["num_gpus"] is None and cpu["num_cpus"] == 2 and cpu["workers"] == 2
