"""Helpers of the reliability tests: start the CLI as a real process, wait for a state on disk, kill it,
and compare what is on disk with an uninterrupted run."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from e2e_helpers import REPO
from storage import RunReader, ShardWriter, load_manifest

# Shards are written in row groups of this many rows in every run these tests compare, so that a
# shard's `.tmp` file exists on disk for most of the time the shard is in flight (with the default
# of 256 rows a tiny shard is only written at close, and "mid-shard" would never see a tmp file).
ROW_GROUP_ROWS = 4

# The teacher run that fault injection interrupts: about 115 sequences in 6 shards, one sequence per
# engine call, so that a shard is in flight for about half a second on two CPU cores.
TEACHER_SHARDS = 6

SHARD_TMP_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.parquet\.\d+\.tmp$")

# The spawned process sets the same row-group size, then runs `pipeline` exactly as the console script does.
_LAUNCH = ("import sys; from storage.writer import ShardWriter; "
           "ShardWriter.__init__.__kwdefaults__['row_group_rows'] = int(sys.argv.pop(1)); "
           "import pipeline; pipeline.main()")


def teacher_args(model_dir: Path, data: Path) -> list:
    """`pipeline teacher` options (without --out) of the run that fault injection interrupts."""
    return ["--model", model_dir, "--data", data, "--capture", "topk", "--top-k", 8, "--seq-len", 64, "--num-shards", TEACHER_SHARDS,
            "--batch-size", 1]


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


def spawn_pipeline(log: Path, *args, row_group_rows: int = ROW_GROUP_ROWS) -> subprocess.Popen:
    """`pipeline ARGS` as a real process; its output goes to `log` (a pipe nobody reads could fill up)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    f = open(log, "a")
    try:
        return subprocess.Popen([sys.executable, "-c", _LAUNCH, str(row_group_rows), *map(str, args)], cwd=REPO,
                                env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    finally:
        f.close()  # the child holds its own descriptor


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0, poll: float = 0.003):
    """Poll `cond()` until it returns something truthy; fail if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before the awaited state; "
                                 f"make the run longer")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for a state on disk")


def shard_tmps(run_dir: Path) -> list[Path]:
    d = Path(run_dir) / "shards"
    return sorted(p for p in d.iterdir() if SHARD_TMP_RE.match(p.name)) if d.is_dir() else []


def final_shards(run_dir: Path) -> list[Path]:
    d = Path(run_dir) / "shards"
    return sorted(d.glob("part-*.parquet")) if d.is_dir() else []


def all_tmps(root: Path) -> list[Path]:
    """Every tmp file or folder anywhere under `root` (shards, receipts, run.json, manifest, checkpoints)."""
    return sorted(p for p in Path(root).rglob("*") if p.name.endswith(".tmp"))


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
