"""Fault injection with real processes and real signals: SIGKILL and SIGTERM of `pipeline teacher`,
SIGKILL of `pipeline student` while it writes checkpoints, and a disk that fills up under a shard.

After every fault, what is on disk under a final name is whole (byte-identical to an uninterrupted run),
no `.tmp` is counted as data, and the restarted command completes the run exactly as if nothing happened.
Kill timings are drawn from a seeded RNG, so a failure reproduces.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from e2e_helpers import cli
from reliability_helpers import (SHARD_TMP_RE, TEACHER_SHARDS, all_tmps, assert_same_run, final_shards,
                                 row_groups, sha256,
                                 shard_tmps, snapshot, spawn_pipeline, wait_for)
from stage2_student import checkpoint as ckpt
from storage import IncompleteRunError, build_manifest, load_manifest, load_run_spec, missing_shards, shard_path
from storage.layout import parse_shard_name, receipt_path

SEED = 1234


def _index(p: Path) -> int:
    return int(SHARD_TMP_RE.match(p.name).group(1)) if SHARD_TMP_RE.match(p.name) else parse_shard_name(p.name)[0]


def _check_after_fault(out: Path, ref_sha: dict[int, str]) -> dict:
    """The invariants that hold after any kill: returns what was on disk (final shards, tmp shards)."""
    assert not (out / "manifest.json").exists(), "the run was not complete: no manifest"
    finals = {_index(p): p for p in final_shards(out)}
    for i, p in finals.items():
        assert receipt_path(p).exists(), f"{p.name} under its final name has a receipt"
        assert sha256(p) == ref_sha[i], f"{p.name} is whole: byte-identical to the uninterrupted run"
        assert json.loads(receipt_path(p).read_text())["sha256"] == ref_sha[i]
    tmps = shard_tmps(out)
    if (out / "run.json").exists():
        spec = load_run_spec(out)
        missing = missing_shards(out, spec)
        assert sorted(set(range(spec.num_shards)) - set(missing)) == sorted(finals)
        assert all(_index(t) in missing for t in tmps), "a .tmp shard is never counted as present"
        with pytest.raises(IncompleteRunError):
            build_manifest(out, write=False)
    return {"finals": sorted(finals), "tmps": [_index(t) for t in tmps]}


@pytest.mark.slow
def test_teacher_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path, teacher_reference):
    args, ref = teacher_reference
    ref_sha = {s.index: s.sha256 for s in load_manifest(ref).shards}
    rng = random.Random(SEED)
    out, log = tmp_path / "run", tmp_path / "teacher.log"
    states = {}

    def kill(p, jitter):
        time.sleep(rng.uniform(0, jitter))
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert p.returncode == -signal.SIGKILL, "the process ended before the kill; make the run longer"

    # 1. right after start: still importing, nothing on disk yet.
    p = spawn_pipeline(log, "teacher", *args, "--out", out)
    kill(p, 1.0)
    states["start"] = _check_after_fault(out, ref_sha)
    assert states["start"]["finals"] == []

    # 2. mid-shard: a shard's row groups are streaming into its .tmp file.
    p = spawn_pipeline(log, "teacher", *args, "--out", out)
    wait_for(lambda: final_shards(out) and shard_tmps(out), p)
    kill(p, 0.05)
    states["mid"] = _check_after_fault(out, ref_sha)
    assert states["mid"]["tmps"], "killed while a shard was in flight"
    stale = shard_tmps(out)

    # 3. between shards: right after a shard was renamed into place.
    done = len(final_shards(out))
    p = spawn_pipeline(log, "teacher", *args, "--out", out)
    wait_for(lambda: len(final_shards(out)) > done, p)
    kill(p, 0.01)
    states["between"] = _check_after_fault(out, ref_sha)
    assert not any(t.exists() for t in stale), "the next writer of a shard removes the tmp a killed one left"
    assert 0 < len(states["between"]["finals"]) < TEACHER_SHARDS

    before = {p.name: p.stat().st_mtime_ns for p in final_shards(out)}
    with row_groups():
        res = cli("teacher", *args, "--out", out)
    assert "finalized" in res.output
    assert all(p.stat().st_mtime_ns == before[p.name] for p in final_shards(out) if p.name in before), \
        "finished shards are skipped on restart, not rewritten"
    assert all_tmps(out) == [], "no leftovers"
    assert_same_run(out, ref)


@pytest.mark.slow
def test_teacher_sigterm_abandons_the_shard_in_flight(tmp_path, teacher_reference):
    args, ref = teacher_reference
    ref_sha = {s.index: s.sha256 for s in load_manifest(ref).shards}
    out, log = tmp_path / "run", tmp_path / "teacher.log"
    p = spawn_pipeline(log, "teacher", *args, "--out", out)
    wait_for(lambda: final_shards(out) and shard_tmps(out), p)
    in_flight = _index(shard_tmps(out)[0])
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=60)
    waited = time.monotonic() - t0
    assert rc == 128 + signal.SIGTERM, (rc, log.read_text()[-2000:])
    assert waited < 10, f"SIGTERM took {waited:.1f}s to stop the process"
    state = _check_after_fault(out, ref_sha)
    assert all_tmps(out) == [], "the shard in flight was abandoned: its tmp file removed"
    assert not shard_path(out, in_flight, TEACHER_SHARDS).exists(), "no partial shard under a final name"
    assert state["finals"] and in_flight not in state["finals"]

    with row_groups():
        cli("teacher", *args, "--out", out)
    assert_same_run(out, ref)


STUDENT_STEPS = 20
_CKPT_FILES = {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", ckpt.STATE}


def _check_checkpoints(out: Path) -> int:
    """Every checkpoint under a final name is whole and loadable; returns the newest step (0: none)."""
    complete = ckpt.complete_checkpoints(out)
    for step, d in complete:
        assert _CKPT_FILES <= {p.name for p in d.iterdir()}, f"{d} is missing files"
        assert ckpt.read_state(d)["step"] == step
        load_file(str(d / "model.safetensors"))  # a truncated file would not parse
    return complete[-1][0] if complete else 0


@pytest.mark.slow
def test_student_sigkill_while_checkpointing_resumes_from_last_complete(tmp_path, tiny_run):
    args = ["--run-dir", tiny_run, "--kl-weight", 1, "--max-steps", STUDENT_STEPS, "--batch-size", 2, "--lr", 1e-3,
            "--warmup-steps", 3, "--verify", "size", "--save-every", 1]
    cli("student", *args, "--out", tmp_path / "ref")
    rng = random.Random(SEED)
    out, log = tmp_path / "killed", tmp_path / "student.log"
    latest, kills_mid_write = 0, 0
    for attempt in range(3):
        target = latest + rng.randint(2, 4)  # kill while checkpoint `target` is being written
        tmp_dir = ckpt.checkpoint_dir(out, target).with_name(f"step-{target:06d}.tmp")
        log.write_text("")
        p = spawn_pipeline(log, "-v", "student", *args, "--out", out, *(["--resume"] if attempt else []))
        wait_for(lambda: tmp_dir.exists() or ckpt.checkpoint_dir(out, target).exists(), p, timeout=180)
        time.sleep(rng.uniform(0, 0.02))
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert p.returncode == -signal.SIGKILL
        if attempt:
            m = re.search(r"resumed from \S+ \(step (\d+)\)", log.read_text())
            assert m and int(m.group(1)) == latest, "resumed from the newest complete checkpoint"
        kills_mid_write += tmp_dir.exists()
        assert not (out / "model").exists()
        latest = _check_checkpoints(out)
        assert latest >= 1
    assert kills_mid_write >= 1, "at least one kill landed inside a checkpoint write"

    res = cli("student", *args, "--out", out, "--resume")
    assert f"{STUDENT_STEPS} steps ({STUDENT_STEPS - latest} this run)" in res.output
    assert all_tmps(out) == [] and not (out / "model.old").exists(), "no leftovers"
    ref, got = load_file(str(tmp_path / "ref" / "model" / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STUDENT_STEPS + 1)), "no duplicated or missing metric lines"


# ---------------------------------------------------------------------------------------------------
# disk full


def _fill(fs: Path, leave: int) -> Path:
    """Write a ballast file so that about `leave` bytes stay free on the filesystem of `fs`."""
    st = os.statvfs(fs)
    size = max(st.f_bavail * st.f_frsize - leave, 0)
    ballast = fs / "ballast"
    with open(ballast, "wb") as f:
        block = b"\0" * (1 << 20)
        while size > 0:
            try:
                size -= f.write(block[:size])
            except OSError as e:  # leave = 0: fill to the last byte
                assert e.errno == errno.ENOSPC
                break
    return ballast


def _pages(n: int, page: int = 4096) -> int:
    return -(-n // page) * page


def _assert_disk_full_error(res, shard: str):
    assert res.exit_code != 0
    assert shard in res.output and "No space left on device" in res.output, res.output
    assert "re-run" in res.output, "says what to do"
    assert "Traceback" not in res.output


@pytest.mark.slow
def test_disk_full_while_writing_a_shard(small_fs, teacher_reference):
    args, ref = teacher_reference
    m = load_manifest(ref)
    fs = small_fs(16 << 20)
    out = fs / "run"
    # Room for run.json, shards 0 and 1 with their receipts, and half of shard 2.
    room = _pages((ref / "run.json").stat().st_size) + _pages(m.shards[2].bytes // 2) + sum(
        _pages(s.bytes) + _pages(receipt_path(ref / "shards" / s.name).stat().st_size) for s in m.shards[:2])
    ballast = _fill(fs, room)
    with row_groups():
        res = cli("teacher", *args, "--out", out, expect_ok=False)
    _assert_disk_full_error(res, "part-00002-of-00006.parquet")
    assert all_tmps(out) == [], "nothing partial is left behind"
    _check_after_fault(out, {s.index: s.sha256 for s in m.shards})
    assert [_index(p) for p in final_shards(out)] == [0, 1], "earlier shards intact"

    ballast.unlink()  # space freed: the same command finishes the run
    with row_groups():
        cli("teacher", *args, "--out", out)
    assert_same_run(out, ref)


def test_disk_full_while_writing_run_json_or_the_manifest(small_fs, teacher_reference):
    args, ref = teacher_reference
    fs = small_fs(4 << 20)
    out = fs / "run"
    shutil.copytree(ref, out)
    (out / "manifest.json").unlink()
    before = snapshot(out / "shards")
    ballast = _fill(fs, 0)
    res = cli("teacher", "--finalize", out, expect_ok=False)
    assert res.exit_code != 0 and "manifest.json" in res.output and "No space left on device" in res.output, res.output
    assert f"--finalize {out}" in res.output and "Traceback" not in res.output
    assert all_tmps(out) == [] and not (out / "manifest.json").exists()
    assert snapshot(out / "shards") == before
    # A new run on the full disk: its first file, run.json, cannot be written.
    res = cli("teacher", *args, "--out", fs / "new", expect_ok=False)
    assert res.exit_code != 0 and "run.json" in res.output and "No space left on device" in res.output, res.output
    assert all_tmps(fs / "new") == [] and not (fs / "new" / "run.json").exists()
    ballast.unlink()
    cli("teacher", "--finalize", out)
    assert_same_run(out, ref)


def test_disk_full_injected(tmp_path, monkeypatch, teacher_reference):
    """The same as test_disk_full_while_writing_a_shard without a small filesystem (runs anywhere): the
    Parquet writer raises ENOSPC on shard 2's second row group, as a full disk does. Shards 0 and 1 are
    taken from the reference run to save time."""
    args, ref = teacher_reference
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    shutil.copy2(ref / "run.json", out / "run.json")
    for i in (0, 1):
        for src in (shard_path(ref, i, TEACHER_SHARDS), receipt_path(shard_path(ref, i, TEACHER_SHARDS))):
            shutil.copy2(src, out / "shards" / src.name)
    before = snapshot(out)
    calls = {"n": 0}
    real = pq.ParquetWriter.write_table

    def write_table(self, table, *a, **kw):
        if "part-00002-of-00006.parquet" in str(self.where):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        return real(self, table, *a, **kw)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_table)
    with row_groups():
        res = cli("teacher", *args, "--out", out, expect_ok=False)
    _assert_disk_full_error(res, "part-00002-of-00006.parquet")
    assert calls["n"] == 2 and all_tmps(out) == []
    assert snapshot(out) == before, "nothing already written changed, nothing new left behind"
    monkeypatch.undo()
    with row_groups():
        cli("teacher", *args, "--out", out)
    assert_same_run(out, ref)


def test_stale_tmp_files_and_half_written_checkpoints_are_never_read(tmp_path):
    """What a kill can leave in the few milliseconds of writing run.json, a receipt, the manifest or a
    checkpoint is never taken for data: readers look at final names only."""
    from storage import RunReader
    from storage.synthetic import synthetic_spec, write_synthetic_run

    run = tmp_path / "run"
    m1, _ = write_synthetic_run(run, synthetic_spec(num_shards=2, num_sequences=8))
    shard = shard_path(run, 1, 2)
    for name in ("run.json.999.tmp", "manifest.json.999.tmp", f"shards/{shard.name}.999.tmp",
                 f"shards/{shard.name}.receipt.json.999.tmp"):
        (run / name).write_bytes(b"PAR1 {half written")
    assert len(RunReader(run)) == 8
    assert [s.to_dict() for s in build_manifest(run).shards] == [s.to_dict() for s in m1.shards]

    out = tmp_path / "student"
    for name, state in (("step-000002", True), ("step-000005.tmp", True), ("step-000009", False)):
        d = out / "checkpoints" / name
        d.mkdir(parents=True)
        if state:
            (d / ckpt.STATE).write_text(json.dumps({"step": int(name[5:11])}))
    assert ckpt.latest_checkpoint(out) == out / "checkpoints" / "step-000002", \
        "a .tmp checkpoint or one without its state file is never resumed from"
