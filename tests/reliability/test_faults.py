"""Fault injection with real processes and real signals: SIGKILL and SIGTERM of `pipeline teacher`,
SIGKILL of `pipeline student` at every step of writing and rotating checkpoints, and a disk that fills up
under a shard.

Where a process dies is decided by the test, never by the clock: the process stops or kills itself at a named
failpoint (`storage/failpoints.py`, set through LABEL_ANNEAL_FAILPOINTS). With `=stop` the test learns of the
stop from the kernel (`waitpid(WUNTRACED)`), checks what is on disk at exactly that step, then kills or signals
it. So every run of these tests kills at the same steps and sees the same files.

After every fault, what is on disk under a final name is whole (byte-identical to an uninterrupted run), no
`.tmp` is counted as data, and the restarted command completes the run exactly as if nothing happened.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from e2e_helpers import cli
from reliability_helpers import (
    SHARD_TMP_RE,
    TEACHER_SHARDS,
    all_tmps,
    assert_same_run,
    final_shards,
    kill_stopped,
    row_groups,
    sha256,
    shard_tmps,
    snapshot,
    spawn_pipeline,
    wait_killed,
    wait_stopped,
)
from safetensors.torch import load_file

from stage2_student import checkpoint as ckpt
from storage import IncompleteRunError, build_manifest, load_manifest, load_run_spec, missing_shards, shard_path
from storage.layout import parse_shard_name, receipt_path


def _index(p: Path) -> int:
    return int(SHARD_TMP_RE.match(p.name).group(1)) if SHARD_TMP_RE.match(p.name) else parse_shard_name(p.name)[0]


def _check_after_fault(out: Path, ref_sha: dict[int, str]) -> dict:
    """The invariants that hold after any kill: returns what was on disk (final shards, tmp shards)."""
    assert not (out / "manifest.json").exists(), "the run was not complete: no manifest"
    finals = {_index(p): p for p in final_shards(out)}
    for i, p in finals.items():
        assert sha256(p) == ref_sha[i], f"{p.name} is whole: byte-identical to the uninterrupted run"
        if receipt_path(p).exists():  # absent only when killed between the link and the receipt
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
def test_teacher_killed_at_each_named_point_then_resume_equals_uninterrupted(tmp_path, teacher_reference):
    args, ref = teacher_reference
    ref_sha = {s.index: s.sha256 for s in load_manifest(ref).shards}
    out, log = tmp_path / "run", tmp_path / "teacher.log"

    def stopped_at(point: str):
        p = spawn_pipeline(log, "teacher", *args, "--out", out, failpoints=f"{point}=stop")
        wait_stopped(p)
        return p

    # 1. start-up: the corpus is tokenized and the spec built; nothing is on disk yet.
    p = stopped_at("teacher.prepared")
    assert not out.exists()
    kill_stopped(p)
    assert not out.exists()

    # 2. mid-shard: two of shard 0's row groups are in its .tmp file.
    p = stopped_at("shard.row_group_written{shard=0,row_group=2}")
    assert _check_after_fault(out, ref_sha) == {"finals": [], "tmps": [0]}
    assert shard_tmps(out)[0].stat().st_size > 0
    kill_stopped(p)
    stale = shard_tmps(out)
    assert _check_after_fault(out, ref_sha) == {"finals": [], "tmps": [0]}, "a killed writer's tmp stays, unread"

    # 3a. shard 1's tmp file is complete but not linked: it is not present, and no receipt exists.
    p = stopped_at("shard.closed{shard=1}")
    kill_stopped(p)
    assert not any(t.exists() for t in stale), "the next writer of a shard removes the tmp a killed one left"
    assert _check_after_fault(out, ref_sha) == {"finals": [0], "tmps": [1]}
    assert not receipt_path(shard_path(out, 1, TEACHER_SHARDS)).exists()

    # 3b. shard 1 linked under its final name, its receipt not yet written: the shard is complete (the
    # finalizer rebuilds the receipt from the file, checked against the reference at the end).
    p = stopped_at("shard.linked{shard=1}")
    kill_stopped(p)
    assert _check_after_fault(out, ref_sha) == {"finals": [0, 1], "tmps": []}
    assert not receipt_path(shard_path(out, 1, TEACHER_SHARDS)).exists()

    # 4. between shards: shard 2 was just linked into place with its receipt, shard 3 not begun.
    p = stopped_at("shard.committed{shard=2}")
    assert _check_after_fault(out, ref_sha) == {"finals": [0, 1, 2], "tmps": []}
    kill_stopped(p)

    # 5. the process kills itself mid-shard (no stop first): the same state as a crash there.
    p = spawn_pipeline(
        log, "teacher", *args, "--out", out, failpoints="shard.row_group_written{shard=4,row_group=3}=kill"
    )
    wait_killed(p)
    assert _check_after_fault(out, ref_sha) == {"finals": [0, 1, 2, 3], "tmps": [4]}

    before = {p.name: p.stat().st_mtime_ns for p in final_shards(out)}
    with row_groups():
        res = cli("teacher", *args, "--out", out)
    assert "finalized" in res.output
    assert all(p.stat().st_mtime_ns == before[p.name] for p in final_shards(out) if p.name in before), (
        "finished shards are skipped on restart, not rewritten"
    )
    assert all_tmps(out) == [], "no leftovers"
    assert_same_run(out, ref)


@pytest.mark.slow
def test_teacher_sigterm_abandons_the_shard_in_flight(tmp_path, teacher_reference):
    args, ref = teacher_reference
    ref_sha = {s.index: s.sha256 for s in load_manifest(ref).shards}
    out, log = tmp_path / "run", tmp_path / "teacher.log"
    # Preemption while shard 1 is in flight: SIGTERM from outside, delivered when the process continues.
    p = spawn_pipeline(
        log, "teacher", *args, "--out", out, failpoints="shard.row_group_written{shard=1,row_group=2}=stop"
    )
    wait_stopped(p)
    assert _check_after_fault(out, ref_sha) == {"finals": [0], "tmps": [1]}
    p.send_signal(signal.SIGTERM)
    p.send_signal(signal.SIGCONT)
    rc = p.wait()
    assert rc == 128 + signal.SIGTERM, (rc, log.read_text()[-2000:])
    assert _check_after_fault(out, ref_sha) == {"finals": [0], "tmps": []}
    assert all_tmps(out) == [], "the shard in flight was abandoned: its tmp file removed"
    assert not receipt_path(shard_path(out, 1, TEACHER_SHARDS)).exists(), "nor a receipt"

    # Preemption right after shard 3 was renamed into place: that shard stays, whole.
    p = spawn_pipeline(log, "teacher", *args, "--out", out, failpoints="shard.committed{shard=3}=term")
    assert p.wait() == 128 + signal.SIGTERM, log.read_text()[-2000:]
    assert _check_after_fault(out, ref_sha) == {"finals": [0, 1, 2, 3], "tmps": []}
    assert all_tmps(out) == []

    with row_groups():
        cli("teacher", *args, "--out", out)
    assert_same_run(out, ref)


STUDENT_STEPS = 20
_CKPT_FILES = {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", ckpt.STATE}

# Each step of writing and rotating a checkpoint, in the order one training run meets them (--save-every 1,
# --keep-checkpoints 2): (failpoint where the run dies, the step it resumed from, the complete checkpoints
# left, the other folders left under checkpoints/). One process per row, each resuming the one before.
STUDENT_FAULTS = [
    # an empty step-3.tmp/ (accelerate writes into it next)
    ("checkpoint.begun{step=3}", 0, [1, 2], ["step-000003.tmp"]),
    # the training state in step-5.tmp/, no state file
    ("checkpoint.files_written{step=5}", 2, [3, 4], ["step-000005.tmp"]),
    # step-7.tmp/ whole, state file included, not renamed
    ("checkpoint.marker_written{step=7}", 4, [5, 6], ["step-000007.tmp"]),
    # step-9/ in place; step 7 not yet rotated out
    ("checkpoint.renamed{step=9}", 6, [7, 8, 9], []),
    # rotation: step 9 renamed out of the namespace, none of its files deleted yet
    ("checkpoint.discard_renamed{step=11,old=9}", 9, [10, 11], ["step-000009.trash"]),
    # rotation: one file of step 11 deleted (before the fix, `rmtree` left a "complete" step-11/ like this)
    ("checkpoint.discard_file_removed{step=13,old=11}", 11, [12, 13], ["step-000011.trash"]),
    # after the last step: the final model whole in model.tmp/, not renamed
    ("model.tmp_written", 13, [19, 20], []),
]


def _check_checkpoints(out: Path) -> list[int]:
    """Every checkpoint under a final name is whole and loadable; returns their steps."""
    complete = ckpt.complete_checkpoints(out)
    for step, d in complete:
        assert _CKPT_FILES <= {p.name for p in d.iterdir()}, f"{d} is missing files"
        assert ckpt.read_state(d)["step"] == step
        load_file(str(d / "model.safetensors"))  # a truncated file would not parse
    return [s for s, _ in complete]


@pytest.mark.slow
def test_student_killed_at_each_checkpoint_step_resumes_from_last_complete(tmp_path, tiny_run):
    args = [
        "--run-dir",
        tiny_run,
        "--kl-weight",
        1,
        "--max-steps",
        STUDENT_STEPS,
        "--batch-size",
        2,
        "--lr",
        1e-3,
        "--warmup-steps",
        3,
        "--verify",
        "size",
        "--save-every",
        1,
        "--keep-checkpoints",
        2,
    ]
    cli("student", *args, "--out", tmp_path / "ref")
    out, log = tmp_path / "killed", tmp_path / "student.log"
    for i, (point, resumed_from, complete, others) in enumerate(STUDENT_FAULTS):
        log.write_text("")
        p = spawn_pipeline(
            log, "-v", "student", *args, "--out", out, *(["--resume"] if i else []), failpoints=f"{point}=kill"
        )
        wait_killed(p)
        if resumed_from:
            m = re.search(r"resumed from \S+ \(step (\d+)\)", log.read_text())
            assert m and int(m.group(1)) == resumed_from, (point, "resumed from the newest complete checkpoint")
        assert _check_checkpoints(out) == complete, point
        left = sorted(p.name for p in (out / "checkpoints").iterdir() if not re.fullmatch(r"step-\d+", p.name))
        assert left == others, point
        assert not (out / "model").exists()

    ref = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))

    def assert_model_equals_ref(d: Path):
        got = load_file(str(d / "model.safetensors"))
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)

    res = cli("student", *args, "--out", out, "--resume")
    assert f"{STUDENT_STEPS} steps (0 this run)" in res.output
    assert all_tmps(out) == [] and not (out / "model.old").exists(), "no leftovers"
    assert_model_equals_ref(out / "model")
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STUDENT_STEPS + 1)), "no duplicated or missing metric lines"

    # Saving over an existing model: killed between moving the old one aside and renaming the new one in.
    # Both copies are whole on disk, and the next run puts the model back.
    p = spawn_pipeline(log, "student", *args, "--out", out, "--resume", failpoints="model.old_moved=kill")
    wait_killed(p)
    assert not (out / "model").exists()
    assert_model_equals_ref(out / "model.old")
    assert_model_equals_ref(out / "model.tmp")
    cli("student", *args, "--out", out, "--resume")
    assert_model_equals_ref(out / "model")
    assert all_tmps(out) == [] and not (out / "model.old").exists(), "no leftovers"


def test_a_checkpoint_missing_a_listed_file_is_not_complete(tmp_path):
    """The state file lists every file with its size: a folder that lost one (or holds a truncated one) is never
    resumed from, whatever removed it."""

    def make(step: int) -> Path:
        d = ckpt.begin(tmp_path, step)
        (d / "model.safetensors").write_bytes(b"w" * 100)
        (d / "optimizer.bin").write_bytes(b"o" * 50)
        (d / "random_states_0.pkl").write_bytes(b"r")
        return ckpt.commit(d, {"step": step}, keep=10)

    a, b, c = make(1), make(2), make(3)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [1, 2, 3]
    (c / "optimizer.bin").unlink()
    (b / "model.safetensors").write_bytes(b"w" * 99)
    assert ckpt.latest_checkpoint(tmp_path) == a
    (a / ckpt.STATE).write_text('{"step": 1, "files": {')  # torn state file
    assert ckpt.latest_checkpoint(tmp_path) is None
    # Written before the state file listed its files: accelerate's own files must be there.
    legacy = ckpt.checkpoint_dir(tmp_path, 7)
    legacy.mkdir()
    (legacy / ckpt.STATE).write_text(json.dumps({"step": 7}))
    assert ckpt.latest_checkpoint(tmp_path) is None
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl"):
        (legacy / name).write_bytes(b"x")
    assert ckpt.latest_checkpoint(tmp_path) == legacy
    # Rotation removes the oldest and any half-deleted leftovers, keeping the newest `keep`.
    (tmp_path / "checkpoints" / "step-000004.trash").mkdir()
    make(8)
    d = ckpt.begin(tmp_path, 9)
    (d / "model.safetensors").write_bytes(b"w")
    ckpt.commit(d, {"step": 9}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000001",
        "step-000002",
        "step-000003",
        "step-000008",
        "step-000009",
    ], "incomplete folders are never resumed from, and not deleted either (they are not ours to judge)"


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
    room = (
        _pages((ref / "run.json").stat().st_size)
        + _pages(m.shards[2].bytes // 2)
        + sum(_pages(s.bytes) + _pages(receipt_path(ref / "shards" / s.name).stat().st_size) for s in m.shards[:2])
    )
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
    for name in (
        "run.json.999.tmp",
        "manifest.json.999.tmp",
        f"shards/{shard.name}.999.tmp",
        f"shards/{shard.name}.receipt.json.999.tmp",
    ):
        (run / name).write_bytes(b"PAR1 {half written")
    assert len(RunReader(run)) == 8
    assert [s.to_dict() for s in build_manifest(run).shards] == [s.to_dict() for s in m1.shards]

    out = tmp_path / "student"
    for name, state in (
        ("step-000002", True),
        ("step-000005.tmp", True),
        ("step-000009", False),
        ("step-000011.trash", True),
    ):
        d = out / "checkpoints" / name
        d.mkdir(parents=True)
        if state:
            (d / ckpt.STATE).write_text(json.dumps({"step": int(name[5:11]), "files": {}}))
    assert ckpt.latest_checkpoint(out) == out / "checkpoints" / "step-000002", (
        "a .tmp or .trash checkpoint, or one without its state file, is never resumed from"
    )
