"""Run directories on S3, against a real S3-compatible server (moto's server mode on 127.0.0.1, tests/s3/conftest.py):
teacher -> inspect -> student round trip, SIGKILL at a failpoint + resume, two writers of one shard, a truncated or
foreign object at a shard key, and the server going away in the middle of an upload.

Every run here is compared with the same run written to a local directory (the code path every other test covers):
the shards in the bucket must be byte-identical to it, and a student trained from the bucket must train exactly as one
trained from the local run."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from e2e_helpers import assert_same_run, big_corpus, cli
from reliability.reliability_helpers import kill_leftovers, row_groups, spawn_pipeline, wait_killed, wait_stopped

from storage import ShardWriter, load_manifest, shard_path
from storage.fs import location
from storage.layout import receipt_path

pytestmark = pytest.mark.s3

SHARDS = 4


@pytest.fixture(autouse=True)
def _no_frozen_children():
    yield
    kill_leftovers()


@pytest.fixture(scope="module")
def teacher_args(tmp_path_factory, tiny_model_dir, tiny_corpus_dir) -> list:
    data = big_corpus(tmp_path_factory.mktemp("s3_corpus") / "big.jsonl", tiny_corpus_dir, copies=2)
    return [
        "--model",
        tiny_model_dir,
        "--data",
        data,
        "--capture",
        "topk",
        "--top-k",
        8,
        "--seq-len",
        64,
        "--num-shards",
        SHARDS,
        "--batch-size",
        4,
    ]


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory, teacher_args):
    """The same teacher run into a local directory: what every bucket run must equal."""
    out = tmp_path_factory.mktemp("s3_ref") / "ref"
    with row_groups():  # the row-group size of the spawned processes (reliability_helpers), for byte equality
        cli("teacher", *teacher_args, "--out", out)
    return out


def _etags(server, bucket: str, prefix: str) -> dict[str, str]:
    r = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for o in r.get("Contents", [])}


def _shard_keys(server, bucket, run="r") -> list[str]:
    return [k for k in server.keys(bucket, f"{run}/shards/") if k.endswith(".parquet")]


def test_teacher_inspect_student_round_trip(tmp_path, s3_server, bucket, teacher_args, local_ref):
    uri = f"s3://{bucket}/runs/r1"
    with row_groups():
        res = cli("teacher", *teacher_args, "--out", uri)
    assert "finalized" in res.output and uri in res.output
    assert not (tmp_path / "s3:").exists() and not os.path.exists("s3:"), "no local directory named after the URI"
    keys = s3_server.keys(bucket)
    assert "runs/r1/run.json" in keys and "runs/r1/manifest.json" in keys
    assert len([k for k in keys if k.endswith(".parquet")]) == SHARDS
    assert not [k for k in keys if k.endswith(".tmp")], "nothing but the run's files"
    assert_same_run(uri, local_ref)  # byte-identical shards, same rows, through the S3 reader
    run_json = s3_server.client().get_object(Bucket=bucket, Key="runs/r1/run.json")["Body"].read().decode()
    assert "testing-secret" not in run_json and "AWS" not in run_json and "127.0.0.1" not in run_json

    info = json.loads(cli("inspect", uri, "--json").output)
    ref_info = json.loads(cli("inspect", local_ref, "--json").output)
    assert info["run_dir"] == uri and info["finalized"]
    for k in ("rows", "trained_tokens", "bytes", "fingerprint", "shards"):
        assert info[k] == ref_info[k], k

    common = ["--kl-weight", 1, "--max-steps", 6, "--batch-size", 2, "--lr", 1e-3, "--warmup-steps", 1]
    cli("student", "--run-dir", uri, "--out", tmp_path / "from_s3", *common)
    cli("student", "--run-dir", local_ref, "--out", tmp_path / "from_local", *common)

    def losses(d):
        return [(m["ce"], m["kl"]) for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]

    np.testing.assert_allclose(losses(tmp_path / "from_s3"), losses(tmp_path / "from_local"), rtol=1e-6)
    saved = json.loads((tmp_path / "from_s3" / "config.json").read_text())
    assert saved["run_dir"] == uri


def test_sigkill_then_resume(tmp_path, s3_server, bucket, teacher_args, local_ref):
    uri, log = f"s3://{bucket}/r", tmp_path / "teacher.log"
    # 1. killed after shard 1 is uploaded under its final name, before its receipt: the shard is whole.
    p = spawn_pipeline(log, "teacher", *teacher_args, "--out", uri, failpoints="shard.linked{shard=1}=kill")
    wait_killed(p)
    ref_sha = {s.name: s.sha256 for s in load_manifest(local_ref).shards}
    assert len(_shard_keys(s3_server, bucket)) == 2
    assert not location(f"{uri}/manifest.json").exists()
    assert not receipt_path(shard_path(uri, 1, SHARDS)).exists()
    from storage import sha256_file

    for i in (0, 1):
        sp = shard_path(uri, i, SHARDS)
        assert sha256_file(sp) == ref_sha[sp.name], "an uploaded shard is whole"
    # 2. killed in the middle of shard 3 (after shard 2): nothing of shard 3 is in the bucket.
    p = spawn_pipeline(
        log, "teacher", *teacher_args, "--out", uri, failpoints="shard.row_group_written{shard=3,row_group=1}=kill"
    )
    wait_killed(p)
    assert len(_shard_keys(s3_server, bucket)) == 3
    assert not [k for k in s3_server.keys(bucket) if "part-00003" in k]
    before = _etags(s3_server, bucket, "r/shards/")
    with row_groups():
        res = cli("teacher", *teacher_args, "--out", uri)
    assert "finalized" in res.output
    after = _etags(s3_server, bucket, "r/shards/")
    assert all(after[k] == v for k, v in before.items()), "finished shards are skipped, not uploaded again"
    assert_same_run(uri, local_ref)
    assert load_manifest(uri).shards[1].sha256 == ref_sha[shard_path(uri, 1, SHARDS).name], "receipt rebuilt"


@pytest.mark.parametrize("conditional", [True, False], ids=["conditional-put", "no-conditional-put"])
def test_two_writers_of_one_shard(s3_server, bucket, conditional, monkeypatch):
    """The first writer to finish wins; the second (even with different bytes) discards its file and returns the
    winner's receipt; the bucket holds one shard and a receipt that describes it. Without conditional writes (a
    store without them, or S3 without boto3) the same holds for writers that finish one after the other."""
    import storage.fs as fs

    if not conditional:
        monkeypatch.setattr(fs, "_s3_client", lambda path: None)
    path = shard_path(f"s3://{bucket}/two", 0, 1)
    a = ShardWriter(path, fingerprint="f" * 32, k=2, vocab_size=50, encoding=_exact())
    b = ShardWriter(path, fingerprint="f" * 32, k=2, vocab_size=50, encoding=_exact())
    for w, rows in ((a, 3), (b, 5)):  # both open at once, different content
        for j in range(rows):
            w.add(j, np.arange(3), np.array([True, True]), np.array([[1, 2], [3, 4]]), np.log([[0.5, 0.25]] * 2))
    ra = a.close()
    rb = b.close()
    assert not a.lost_race and b.lost_race
    assert rb == ra and ra.rows == 3
    from storage import sha256_file

    assert sha256_file(path) == ra.sha256
    assert json.loads(receipt_path(path).read_text()) == ra.to_dict()
    # (pyarrow leaves an empty "directory" marker `two/shards/` after deleting the tmp object: no reader lists it)
    assert [k for k in s3_server.keys(bucket) if not k.endswith("/")] == [
        "two/shards/part-00000-of-00001.parquet",
        "two/shards/part-00000-of-00001.parquet.receipt.json",
    ]


def _exact():
    from storage import Encoding

    return Encoding.exact()


def test_truncated_or_foreign_object_at_a_shard_key(tmp_path, s3_server, bucket, teacher_args):
    uri = f"s3://{bucket}/bad"
    cli("teacher", *teacher_args, "--out", uri)
    c = s3_server.client()
    key0 = f"bad/shards/{shard_path(uri, 0, SHARDS).name}"
    whole = c.get_object(Bucket=bucket, Key=key0)["Body"].read()
    # 1. a finished run whose shard was replaced by a truncated object: stage 2 refuses it, naming the shard.
    c.put_object(Bucket=bucket, Key=key0, Body=whole[: len(whole) // 2])
    r = cli("student", "--run-dir", uri, "--out", tmp_path / "s", "--max-steps", 1, expect_ok=False)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert f"s3://{bucket}/{key0}" in r.output
    assert "truncated" in r.output
    # 2. no manifest, no receipt, the truncated object under the final name: finalizing names it and the fix.
    c.delete_object(Bucket=bucket, Key="bad/manifest.json")
    c.delete_object(Bucket=bucket, Key=key0 + ".receipt.json")
    r = cli("teacher", "--finalize", uri, expect_ok=False)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "not a readable Parquet file" in r.output and "part-00000" in r.output and "Delete" in r.output
    # 3. a shard of another run under the same name: refused as foreign.
    c.delete_object(Bucket=bucket, Key=key0)
    w = ShardWriter(shard_path(uri, 0, SHARDS), fingerprint="f" * 32, k=8, vocab_size=384, encoding=_exact())
    w.close()
    r = cli("teacher", "--finalize", uri, expect_ok=False)
    assert r.exit_code != 0 and "another run" in r.output and "Traceback" not in r.output
    assert not location(f"{uri}/manifest.json").exists(), "nothing counted as done"


def test_server_going_away_mid_upload(tmp_path, s3_server, bucket, teacher_args, local_ref):
    """The store stops answering while shard 1 is being uploaded: a clear error, and nothing half-written under a
    final name; with the store back, the same command completes the run."""
    uri, log = f"s3://{bucket}/away", tmp_path / "teacher.log"
    p = spawn_pipeline(log, "teacher", *teacher_args, "--out", uri, failpoints="shard.closed{shard=1}=stop")
    wait_stopped(p)  # shard 1 is complete in its local staging file, about to be uploaded
    s3_server.stop()
    os.kill(p.pid, signal.SIGCONT)
    assert p.wait() == 1
    out = log.read_text()
    assert "Traceback" not in out and "could not upload" in out and "part-00001" in out, out[-3000:]
    s3_server.start()  # a new server over the same data (new port: AWS_ENDPOINT_URL follows)
    keys = s3_server.keys(bucket, "away/")
    assert [k for k in keys if "part-00001" in k] == [], "nothing of shard 1 is listed"
    assert "away/manifest.json" not in keys and len(_shard_keys(s3_server, bucket, "away")) == 1
    with row_groups():
        res = cli("teacher", *teacher_args, "--out", uri)
    assert "finalized" in res.output
    assert_same_run(uri, local_ref)
