"""Writers that share a process id, as the entry processes of containers do (every one is PID 1): two pods
writing one shard (a Kubernetes Indexed Job may run two pods for one index), finalizers racing on the
manifest, and a kill inside the run.json / manifest writes.

Each child fakes `os.getpid() == 1` before importing anything, so every name that was unique "by pid" alone
would collide. The interleavings are forced with failpoints (`=stop`, then SIGCONT or SIGKILL), never timed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_helpers import REPO
from reliability_helpers import all_tmps, kill_stopped, sha256, wait_stopped

from storage import build_manifest, claim_run_dir, load_run_spec, shard_path, verify_shard
from storage.failpoints import ENV as FAILPOINTS_ENV
from storage.layout import receipt_path
from storage.synthetic import synthetic_spec, write_synthetic_run

_CHILD = r"""
import os, sys, json
os.getpid = lambda: 1  # the entry process of every container
from pathlib import Path
from storage import Encoding, ShardWriter, build_manifest, claim_run_dir, load_run_spec, shard_path
from storage.synthetic import synthetic_rows, synthetic_spec

cmd, run, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
if cmd == "write":  # shard 0 with the values of seed n: two writers with other seeds write other bytes
    spec = load_run_spec(run)
    w = ShardWriter(shard_path(run, 0, spec.num_shards), fingerprint=spec.fingerprint, k=spec.k,
                    vocab_size=spec.vocab_size, encoding=Encoding.from_dict(spec.encoding), row_group_rows=2)
    with w:
        for shard, *row in synthetic_rows(spec, seed=n):
            if shard == 0:
                w.add(*row)
        r = w.close()
    print(json.dumps({"sha256": r.sha256, "lost": w.lost_race}))
elif cmd == "finalize":
    for _ in range(n):
        build_manifest(run)
elif cmd == "claim":
    claim_run_dir(run, synthetic_spec(num_shards=2, num_sequences=8))
"""


def _child(cmd: str, run: Path, n: int, failpoints: str = "") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(FAILPOINTS_ENV, None)
    if failpoints:
        env[FAILPOINTS_ENV] = failpoints
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, cmd, str(run), str(n)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(p: subprocess.Popen) -> dict | None:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return json.loads(out.splitlines()[-1]) if out.strip() else None


def _continue(p: subprocess.Popen) -> dict | None:
    p.send_signal(signal.SIGCONT)
    return _finish(p)


@pytest.fixture
def run(tmp_path) -> Path:
    """A run of 2 shards whose shard 1 is written; shard 0 is what the tests' writers race on."""
    spec = synthetic_spec(num_shards=2, num_sequences=8)
    write_synthetic_run(tmp_path / "run", spec, finalize=False)
    for p in (shard_path(tmp_path / "run", 0, 2), receipt_path(shard_path(tmp_path / "run", 0, 2))):
        p.unlink()
    return tmp_path / "run"


def _assert_one_consistent_shard(run: Path, expect_sha: str) -> None:
    shard = shard_path(run, 0, 2)
    receipt = json.loads(receipt_path(shard).read_text())
    assert sha256(shard) == receipt["sha256"] == expect_sha, "the receipt describes the file under the final name"
    assert all_tmps(run) == [], "the loser's tmp file is gone"
    m = build_manifest(run)
    verify_shard(shard, m.shards[0], m.spec, checksum=True)


def test_second_writer_finishes_first_the_other_loses_cleanly(run):
    """Pod A has its shard complete in its tmp file (not linked yet) when pod B, also PID 1, writes the same
    shard from start to end. B's start must not remove A's live tmp; B links first and wins; A then finds
    the shard present, discards its own file and reports B's receipt."""
    a = _child("write", run, 1, "shard.closed{shard=0}=stop")
    wait_stopped(a)
    (a_tmp,) = [p for p in all_tmps(run)]
    b = _finish(_child("write", run, 2))
    assert a_tmp.exists(), "a live writer's tmp (same host, same pid) survives the other writer's sweep"
    assert b["lost"] is False
    got = _continue(a)
    assert got == {"sha256": b["sha256"], "lost": True}
    _assert_one_consistent_shard(run, b["sha256"])


def test_first_writer_links_then_stops_before_its_receipt(run):
    """Pod A links the shard and stops before writing its receipt; pod B (PID 1 too, other bytes) finishes
    and loses the link. A finalizer in between rebuilds the missing receipt from the file. Whatever the
    order, the receipt left at the end matches the file under the final name."""
    a = _child("write", run, 1, "shard.linked{shard=0}=stop")
    wait_stopped(a)
    shard = shard_path(run, 0, 2)
    assert shard.exists() and not receipt_path(shard).exists()
    a_sha = sha256(shard)
    b = _finish(_child("write", run, 2))
    assert b == {"sha256": a_sha, "lost": True}, "the loser reports the winner's shard, not its own"
    assert build_manifest(run).shards[0].sha256 == a_sha, "a finalizer meanwhile rebuilds the receipt"
    assert _continue(a) == {"sha256": a_sha, "lost": False}
    _assert_one_consistent_shard(run, a_sha)


def test_concurrent_finalizers_never_expose_a_partial_manifest(run):
    """Four finalizers, all PID 1, rebuild the manifest 25 times each while this process reads it: every
    read is a whole manifest, and no finalizer fails (no false "free space" error from a shared tmp)."""
    _finish(_child("write", run, 0))
    build_manifest(run)
    want = (run / "manifest.json").read_text()
    procs = [_child("finalize", run, 25) for _ in range(4)]
    reads = 0
    while any(p.poll() is None for p in procs) or reads == 0:
        text = (run / "manifest.json").read_text()  # open() follows the name: old file or new, never a half
        assert text == want, f"read {reads}: {len(text)} bytes"
        reads += 1
    for p in procs:
        _finish(p)
    assert all_tmps(run) == []


def test_a_finalizer_killed_inside_the_manifest_write_leaves_nothing_that_matters(run):
    """SIGKILL with the manifest's tmp complete but not renamed: the old manifest (or none) stays, another
    finalizer (PID 1 too) succeeds meanwhile, and the next one sweeps the dead one's tmp."""
    _finish(_child("write", run, 0))
    a = _child("finalize", run, 1, "manifest.tmp_written=stop")
    wait_stopped(a)
    assert not (run / "manifest.json").exists()
    _finish(_child("finalize", run, 1))  # the same pid, while the other's tmp is there: no collision
    good = (run / "manifest.json").read_text()
    kill_stopped(a)
    (litter,) = all_tmps(run)
    assert litter.name.startswith("manifest.json.")
    assert (run / "manifest.json").read_text() == good
    build_manifest(run)
    assert all_tmps(run) == [], "the dead finalizer's tmp is swept by the next"


def test_a_kill_inside_the_run_json_write_is_swept_by_the_next_claim(tmp_path):
    run = tmp_path / "run"
    p = _child("claim", run, 0, "run_spec.tmp_written=kill")
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL
    assert not (run / "run.json").exists() and len(all_tmps(run)) == 1
    spec = synthetic_spec(num_shards=2, num_sequences=8)
    claim_run_dir(run, spec)
    assert all_tmps(run) == [] and load_run_spec(run).fingerprint == spec.fingerprint
