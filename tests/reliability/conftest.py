"""Fixtures of the reliability tests: the uninterrupted teacher run every faulted run must equal, the
e2e `tiny_run` (stage-2 tests), and a small tmpfs for disk-full tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from e2e.conftest import tiny_run  # noqa: F401  (the finalised k = vocab run of tests/e2e, reused here)
from e2e_helpers import big_corpus, cli
from reliability_helpers import kill_leftovers, row_groups, teacher_args


@pytest.fixture(autouse=True)
def _no_frozen_children():
    """A test that fails while its child is stopped at a failpoint must not leave the child behind."""
    yield
    kill_leftovers()


@pytest.fixture(scope="session")
def teacher_corpus(tmp_path_factory, tiny_corpus_dir) -> Path:
    return big_corpus(tmp_path_factory.mktemp("reliability_corpus") / "big.jsonl", tiny_corpus_dir, copies=3)


@pytest.fixture(scope="session")
def teacher_reference(tmp_path_factory, tiny_model_dir, teacher_corpus) -> tuple[list, Path]:
    """(args without --out, run dir) of one uninterrupted run, written with the row-group size the
    spawned processes use, so that a resumed run must be byte-identical to it."""
    args = teacher_args(tiny_model_dir, teacher_corpus)
    out = tmp_path_factory.mktemp("reliability_ref") / "ref"
    with row_groups():
        cli("teacher", *args, "--out", out)
    return args, out


@pytest.fixture
def small_fs(tmp_path):
    """mount(size) mounts a fresh tmpfs of `size` bytes and returns its path; unmounted afterwards.
    Skips when this machine does not let the test mount one (no root / no CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        mnt = tmp_path / f"fs{len(mounted)}"
        mnt.mkdir()
        try:
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                check=True,
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"cannot mount a tmpfs here ({e}); test_disk_full_injected covers the same path")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        r = subprocess.run(["umount", str(mnt)], capture_output=True)
        if r.returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
