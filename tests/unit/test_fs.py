"""storage.fs without a server: location parsing, refusals before anything is written, and the whole storage layer
(writer, receipts, manifest, run reader) on a non-local filesystem through fsspec's in-memory driver, which takes the
path a store without conditional writes takes (upload to a tmp name, then move). The S3 server tests are tests/s3."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import pytest
from e2e_helpers import cli

from storage import Encoding, RunReader, ShardWriter, build_manifest, claim_run_dir, load_manifest, shard_path
from storage.fs import LocationError, RemotePath, location
from storage.layout import receipt_path
from storage.spec import RunSpec


def test_location_parses_paths_and_uris():
    assert location("runs/r1") == Path("runs/r1")
    assert location("file:///tmp/x") == Path("/tmp/x")
    r = location("s3://bucket/runs/r1/?region=us-east-1")  # a region given: no lookup over the network
    assert isinstance(r, RemotePath) and str(r) == "s3://bucket/runs/r1"
    assert str(r / "shards" / "a.parquet") == "s3://bucket/runs/r1/shards/a.parquet"
    assert (r / "x").parent == r and r.name == "r1" and str(r.with_name("r2")) == "s3://bucket/runs/r2"


@pytest.mark.parametrize(
    "uri, words",
    [
        ("foo://bucket/run", ["unknown scheme foo://", "s3://"]),
        ("s3://AKIA:s3cr3tv4lue@bucket/run", ["credentials in the URI are refused", "AWS_ACCESS_KEY_ID"]),
        ("s3://bucket/run?secret_key=s3cr3tv4lue", ["credentials in the URI are refused"]),
    ],
)
def test_bad_uri_refused_before_anything_is_written(tmp_path, monkeypatch, tiny_model_dir, tiny_corpus_dir, uri, words):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LocationError) as e:
        location(uri)
    assert all(w in str(e.value) for w in words) and "s3cr3tv4lue" not in str(e.value)
    r = cli(
        "teacher", "--model", tiny_model_dir, "--data", tiny_corpus_dir / "text.jsonl", "--out", uri, expect_ok=False
    )
    assert r.exit_code == 2 and "--out" in r.output and words[0] in r.output and "s3cr3tv4lue" not in r.output
    assert "Traceback" not in r.output
    assert os.listdir(tmp_path) == [], "nothing written (no ./foo:/bucket/run directory)"
    r = cli("inspect", uri, expect_ok=False)
    assert r.exit_code == 2 and words[0] in r.output
    r = cli("student", "--run-dir", uri, "--out", tmp_path / "s", expect_ok=False)
    assert r.exit_code == 2 and words[0] in r.output and os.listdir(tmp_path) == []


def test_student_output_must_be_local(tmp_path):
    r = cli("student", "--run-dir", tmp_path, "--out", "s3://bucket/out", expect_ok=False)
    assert r.exit_code == 2 and "local directory" in r.output


def _spec(num_shards: int) -> RunSpec:
    return RunSpec(
        teacher={"name_or_path": "t"},
        tokenizer={"hash": "h"},
        vocab_size=50,
        k=2,
        encoding=Encoding.exact().to_dict(),
        capture={"engine": "hf", "mode": "topk"},
        corpus={"fingerprint": "c"},
        seq_len=4,
        num_shards=num_shards,
        num_sequences=None,
    )


def _fill(w: ShardWriter, rows: int, first: int = 0) -> None:
    for j in range(first, first + rows):
        lps = np.log(np.array([[0.5, 0.25], [0.6, 0.1 + (j % 10) / 100]], dtype=np.float32))
        w.add(j, np.arange(3) + j, np.array([True, True]), np.array([[1, 2], [3, 4 + j % 40]]), lps)


def test_storage_layer_on_a_non_local_filesystem():
    run = location(f"memory://run-{secrets.token_hex(4)}")
    spec = claim_run_dir(run, _spec(2))
    assert claim_run_dir(str(run), _spec(2)).fingerprint == spec.fingerprint, "same settings: accepted again"
    rows = {0: 5, 1: 3}
    for i, n in rows.items():
        w = ShardWriter(
            shard_path(run, i, 2), fingerprint=spec.fingerprint, k=2, vocab_size=50, encoding=Encoding.exact()
        )
        _fill(w, n, first=i * 100)
        w.close()
    # two writers of shard 1: the second one loses and gets the winner's receipt
    late = ShardWriter(
        shard_path(run, 1, 2), fingerprint=spec.fingerprint, k=2, vocab_size=50, encoding=Encoding.exact()
    )
    _fill(late, 7, first=100)
    assert late.close().rows == 3 and late.lost_race
    names = sorted(p.name for p in (run / "shards").iterdir())
    assert names == [
        "part-00000-of-00002.parquet",
        "part-00000-of-00002.parquet.receipt.json",
        "part-00001-of-00002.parquet",
        "part-00001-of-00002.parquet.receipt.json",
    ], "no tmp object left"
    receipt_path(shard_path(run, 1, 2)).unlink()  # lost receipt: rebuilt from the shard
    m = build_manifest(run)
    assert m.rows == 8 and load_manifest(str(run)).to_dict() == m.to_dict()
    got = [r.sample_id for r in RunReader(str(run), verify="checksum")]
    assert got == [0, 1, 2, 3, 4, 100, 101, 102]


def test_ray_with_a_bucket_is_refused_before_work():
    from stage1_teacher.config import TeacherConfig

    with pytest.raises(ValueError, match="--ray writes into a local or shared-filesystem run directory only"):
        TeacherConfig(model="m", data="d.jsonl", out="s3://bucket/run?region=us-east-1", ray=True)
