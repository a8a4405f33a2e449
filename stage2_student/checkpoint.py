"""Checkpoints that are either complete or ignored, at every instant of writing and of rotation.

Writing: `step-NNNNNN.tmp/` receives the training state (accelerate's files), each file is fsynced, then
`trainer_state.json` is written last, listing every file with its size; the folder is renamed to `step-NNNNNN/`.
Removing (rotation, or replacing a folder of the same step): the folder is first renamed out of the `step-NNNNNN`
namespace (`step-NNNNNN.trash`), then deleted file by file. A kill at any point therefore leaves each `step-NNNNNN/`
either whole or absent, never a folder that looks complete but lacks files.

A checkpoint counts as complete only if its state file parses and every file it lists is present with that size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from storage import failpoints
from storage.atomic import atomic_write_json, fsync_dir, fsync_file

_CKPT_RE = re.compile(r"^step-(\d{6,})$")
STATE = "trainer_state.json"
TMP_SUFFIX, TRASH_SUFFIX = ".tmp", ".trash"
# What accelerate always writes for one process; used only for checkpoints written before the state file
# listed its files.
_LEGACY_REQUIRED = ("model", "optimizer", "random_states_0.pkl")

_BEGUN = failpoints.declare("checkpoint.begun", "an empty step-N.tmp/ exists; the processes write into it next")
_FILES_WRITTEN = failpoints.declare("checkpoint.files_written", "the training state is in step-N.tmp/, no state file")
_MARKER_WRITTEN = failpoints.declare(
    "checkpoint.marker_written", "step-N.tmp/ is whole, state file included; not renamed"
)
_RENAMED = failpoints.declare("checkpoint.renamed", "step-N/ is in place; older checkpoints not yet rotated")
_DISCARD_RENAMED = failpoints.declare(
    "checkpoint.discard_renamed", "an old checkpoint (field old) was renamed to step-OLD.trash, nothing deleted yet"
)
_DISCARD_FILE_REMOVED = failpoints.declare(
    "checkpoint.discard_file_removed", "one more file of step-OLD.trash was deleted (field old; count with hit=N)"
)


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:06d}"


def tmp_dir(out: Path, step: int) -> Path:
    """Where checkpoint `step` is written before it is renamed into place (every process writes here)."""
    d = checkpoint_dir(out, step)
    return d.with_name(d.name + TMP_SUFFIX)


def _files(root: Path) -> dict[str, int]:
    """Relative path -> size of every file under `root` (accelerate may write sub-folders, e.g. under FSDP)."""
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def is_complete(d: Path) -> bool:
    """The state file parses and every file it lists is there with its recorded size."""
    try:
        state = json.loads((d / STATE).read_text())
    except (OSError, ValueError):
        return False
    listed = state.get("files") if isinstance(state, dict) else None
    if listed is None:  # written before the state file listed the files
        names = [p.name for p in d.iterdir()]
        return all(any(n.startswith(req) for n in names) for req in _LEGACY_REQUIRED)
    for rel, size in listed.items():
        try:
            if (d / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = complete_checkpoints(out)
    return found[-1][1] if found else None


def begin(out: Path, step: int) -> Path:
    """An empty `step-N.tmp/` (a stale one from a killed run is removed first). Main process only."""
    tmp = tmp_dir(out, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _BEGUN(step=step)
    return tmp


def commit(tmp: Path, state: dict, keep: int) -> Path:
    """Make `tmp` (holding the training state) the complete checkpoint `state["step"]`, then keep the newest
    `keep` complete checkpoints and delete leftovers of killed runs. Main process only, after every process
    has written its files into `tmp`."""
    step = state["step"]
    _FILES_WRITTEN(step=step)
    files = _files(tmp)
    for rel in files:  # the rename below must not publish data still in the page cache
        fsync_file(tmp / rel)
    atomic_write_json(tmp / STATE, {**state, "files": files})
    _MARKER_WRITTEN(step=step)
    final = tmp.with_name(tmp.name[: -len(TMP_SUFFIX)])
    if final.exists():  # an incomplete folder of the same step (never the one we resumed from: that is older)
        _discard(final, step)
    tmp.rename(final)
    fsync_dir(final.parent)
    _RENAMED(step=step)
    for _, old in complete_checkpoints(final.parent.parent)[:-keep]:
        _discard(old, step)
    for stale in final.parent.iterdir():  # what killed runs left: tmp folders of other steps, half-deleted trash
        if stale.name.endswith(TRASH_SUFFIX) or (stale.name.endswith(TMP_SUFFIX) and stale != tmp):
            _remove_tree(stale, step)
    return final


def _discard(d: Path, step: int) -> None:
    """Take `d` out of the `step-N` namespace with one rename, then delete it: a kill in the middle never leaves
    a checkpoint that looks complete without its files."""
    trash = d.with_name(d.name + TRASH_SUFFIX)
    if trash.exists():
        _remove_tree(trash, step)
    d.rename(trash)
    fsync_dir(d.parent)
    old = int(d.name.removeprefix("step-"))
    _DISCARD_RENAMED(step=step, old=old)
    _remove_tree(trash, step, old=old)


def _remove_tree(d: Path, step: int, old: int | None = None) -> None:
    if not d.is_dir():
        d.unlink(missing_ok=True)
        return
    for root, dirs, names in os.walk(d, topdown=False):
        for name in names:
            os.unlink(os.path.join(root, name))
            _DISCARD_FILE_REMOVED(step=step, old=old)
        for name in dirs:
            os.rmdir(os.path.join(root, name))
    os.rmdir(d)


def discard_all(out: Path) -> None:
    """Remove every checkpoint folder under `out` (--overwrite), each one renamed out of the `step-N` namespace
    first: a kill in the middle leaves nothing that looks complete. Other files under checkpoints/ stay."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if _CKPT_RE.match(p.name) and p.is_dir():
            _discard(p, 0)
        elif p.name.endswith((TMP_SUFFIX, TRASH_SUFFIX)) and _CKPT_RE.match(p.name.rsplit(".", 1)[0]):
            _remove_tree(p, 0)


def read_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE).read_text())
