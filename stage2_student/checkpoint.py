"""Checkpoints that are either complete or ignored: written to `step-NNNNNN.tmp/`, then renamed."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from storage.atomic import atomic_write_json, fsync_dir

_CKPT_RE = re.compile(r"^step-(\d{6,})$")
STATE = "trainer_state.json"


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:06d}"


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and (p / STATE).is_file():  # the state file is written last, inside the tmp dir
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = complete_checkpoints(out)
    return found[-1][1] if found else None


def begin(out: Path, step: int) -> Path:
    tmp = checkpoint_dir(out, step).with_name(f"step-{step:06d}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, state: dict, keep: int) -> Path:
    atomic_write_json(tmp / STATE, state)
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(final.parent)
    for _, old in complete_checkpoints(final.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in final.parent.glob("step-*.tmp"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def read_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE).read_text())
