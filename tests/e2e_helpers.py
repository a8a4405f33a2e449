"""Helpers for end-to-end tests: run the CLI in-process or as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]


def cli(*args, expect_ok: bool = True):
    """Run `pipeline ARGS` in-process; returns the click Result."""
    from pipeline import cli as group

    result = CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=False)
    if expect_ok and result.exit_code != 0:
        raise AssertionError(f"pipeline {' '.join(map(str, args))} failed ({result.exit_code}):\n{result.output}")
    return result


def spawn(*args, env: dict | None = None) -> subprocess.Popen:
    """Start `python -m pipeline ARGS` as a real process (for kill and concurrency tests)."""
    e = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        cwd=REPO,
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def big_corpus(path: Path, tiny_corpus_dir: Path, copies: int) -> Path:
    """The tiny text corpus repeated (with a copy number so documents differ), for runs long enough to kill."""
    rows = [json.loads(l) for l in (tiny_corpus_dir / "text.jsonl").read_text().splitlines()]
    with open(path, "w") as f:
        for c in range(copies):
            for r in rows:
                if isinstance(r.get("text"), str) and r["text"]:
                    f.write(json.dumps({"text": f"{c}: {r['text']}"}) + "\n")
    return path


def assert_same_run(a: Path, b: Path) -> None:
    """Two run directories hold the same rows and byte-identical shards."""
    import numpy as np

    from storage import RunReader, load_manifest

    ra, rb = {r.sample_id: r for r in RunReader(a)}, {r.sample_id: r for r in RunReader(b)}
    assert sorted(ra) == sorted(rb) and len(ra) > 0
    for sid in ra:
        for f in ("input_ids", "label_mask", "topk_ids", "topk_logprobs", "tail_logprob"):
            np.testing.assert_array_equal(getattr(ra[sid], f), getattr(rb[sid], f), err_msg=f"{sid} {f}")
    ma, mb = load_manifest(a), load_manifest(b)
    assert ma.spec.fingerprint == mb.spec.fingerprint
    assert [s.sha256 for s in ma.shards] == [s.sha256 for s in mb.shards], "shards are byte-identical"
    assert ma.to_dict()["totals"] == mb.to_dict()["totals"]
