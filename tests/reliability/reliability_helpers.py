"""Helpers of the reliability tests: start the CLI as a real process, wait for a state on disk, kill it,
and compare what is on disk with an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from e2e_helpers import REPO

from storage import ShardWriter, load_manifest
from storage.failpoints import ENV as FAILPOINTS_ENV

# Shards are written in row groups of this many rows in every run these tests compare, so that a shard
# has several row groups (failpoint `shard.row_group_written` names one); with the default of 256 rows a
# tiny shard is written in one piece at close.
ROW_GROUP_ROWS = 4

# The teacher run that fault injection interrupts: about 115 sequences in 6 shards (about 19 each, so 5
# row groups), one sequence per engine call.
TEACHER_SHARDS = 6

# <shard>.<host>.<pid>.<random>.tmp (storage.atomic.tmp_path); not a receipt's tmp (<shard>.receipt.json...)
SHARD_TMP_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.parquet\.(?!receipt\.)[^.]+\.\d+\.[0-9a-f]+\.tmp$")

# The spawned process sets the same row-group size, then runs `pipeline` exactly as the console script does.
_LAUNCH = (
    "import sys; from storage.writer import ShardWriter; "
    "ShardWriter.__init__.__kwdefaults__['row_group_rows'] = int(sys.argv.pop(1)); "
    "import pipeline; pipeline.main()"
)


def teacher_args(model_dir: Path, data: Path) -> list:
    """`pipeline teacher` options (without --out) of the run that fault injection interrupts."""
    return [
        "--model",
        model_dir,
        "--data",
        data,
        "--capture",
        "topk",
        "--top-k",
        8,
        "--seq-len",
        64,
        "--num-shards",
        TEACHER_SHARDS,
        "--batch-size",
        1,
    ]


@contextmanager
def row_groups(n: int = ROW_GROUP_ROWS):
    """In this process, write shards in row groups of `n` rows (what `spawn_pipeline` does in its child)."""
    defaults = ShardWriter.__init__.__kwdefaults__
    old = defaults["row_group_rows"]
    defaults["row_group_rows"] = n
    try:
        yield
    finally:
        defaults["row_group_rows"] = old


_SPAWNED: list[subprocess.Popen] = []


def spawn_pipeline(log: Path, *args, failpoints: str = "", row_group_rows: int = ROW_GROUP_ROWS) -> subprocess.Popen:
    """`pipeline ARGS` as a real process; its output goes to `log` (a pipe nobody reads could fill up).
    `failpoints`: what the process does to itself at a named point (`storage.failpoints`), e.g.
    "shard.row_group_written{shard=1,row_group=2}=stop"."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop(FAILPOINTS_ENV, None)
    if failpoints:
        env[FAILPOINTS_ENV] = failpoints
    f = open(log, "a")
    try:
        p = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, str(row_group_rows), *map(str, args)],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
        )
    finally:
        f.close()  # the child holds its own descriptor
    p.log = log
    _SPAWNED.append(p)
    return p


def kill_leftovers() -> None:
    """Kill every process spawned here that still runs (or is stopped at a failpoint): a failed assertion
    must not leave a frozen child behind."""
    while _SPAWNED:
        p = _SPAWNED.pop()
        if p.poll() is None:
            p.kill()
            p.wait()


def _tail(p: subprocess.Popen) -> str:
    return Path(p.log).read_text()[-3000:] if getattr(p, "log", None) else ""


def wait_stopped(p: subprocess.Popen) -> None:
    """Block until the process has stopped itself at its failpoint (SIGSTOP). No polling and no clock: the
    kernel reports the stop to its parent. Fails if the process exits instead."""
    pid, status = os.waitpid(p.pid, os.WUNTRACED)
    if os.WIFSTOPPED(status):
        return
    p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
    raise AssertionError(f"the process exited ({p.returncode}) without reaching its failpoint:\n{_tail(p)}")


def kill_stopped(p: subprocess.Popen) -> None:
    """SIGKILL a process stopped at its failpoint: the crash happens exactly there."""
    p.kill()
    assert p.wait() == -signal.SIGKILL


def wait_killed(p: subprocess.Popen) -> None:
    """Wait for a process that SIGKILLs itself at its failpoint (`=kill`)."""
    rc = p.wait()
    assert rc == -signal.SIGKILL, f"the process exited ({rc}) without reaching its failpoint:\n{_tail(p)}"


def shard_tmps(run_dir: Path) -> list[Path]:
    d = Path(run_dir) / "shards"
    return sorted(p for p in d.iterdir() if SHARD_TMP_RE.match(p.name)) if d.is_dir() else []


def final_shards(run_dir: Path) -> list[Path]:
    d = Path(run_dir) / "shards"
    return sorted(d.glob("part-*.parquet")) if d.is_dir() else []


def all_tmps(root: Path) -> list[Path]:
    """Every tmp file or folder anywhere under `root` (shards, receipts, run.json, manifest, checkpoints), and
    every checkpoint folder left half-deleted (`.trash`)."""
    return sorted(p for p in Path(root).rglob("*") if p.name.endswith((".tmp", ".trash")))


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file under `root`: proof that nothing was touched."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (sha256(p), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_run(got: Path, ref: Path) -> None:
    """Identical rows and byte-identical shards, and every shard's bytes match its checksum."""
    from e2e_helpers import assert_same_run as same_rows_and_shards

    same_rows_and_shards(got, ref)
    for s in load_manifest(got).shards:
        assert sha256(Path(got) / "shards" / s.name) == s.sha256
