"""`pipeline teacher --ray` on a local Ray instance: the same shards, byte for byte, as one process; resume.

    make test-ray        # or: .venv/bin/python -m pytest -m ray tests/ray -q

Each `--ray` run starts (and stops) its own local Ray instance in a real subprocess, as a user would;
most of the ~1.5 minutes is Ray starting up (~10 s) and two workers importing torch.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray.data", reason="needs the [ray] extra: make .venv/.ray-installed")

from e2e_helpers import assert_same_run, cli, spawn  # noqa: E402

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
    assert f"scoring {NUM_SHARDS - 1} shards with 2 Ray workers" in log
    assert first.stat().st_mtime_ns == before, "the finished shard is skipped, not rewritten"
    assert (out / "manifest.json").exists()
    info = json.loads((out / "manifest.json").read_text())
    assert [s["index"] for s in info["shards"]] == list(range(NUM_SHARDS))
    assert_same_run(out, reference)
