"""Atomic file writes: write to a unique `.tmp` file, fsync, rename, fsync the directory.

A file that exists under its final name is therefore complete; a `.tmp` left by a killed process is
never read, and is removed by the next writer of the same file once nobody holds it.

Names that hold in containers and across hosts
    Every entry process of a container is PID 1, and the tasks of a SLURM or Kubernetes array run on
    many hosts that share one directory: a tmp name made unique by the process id alone is shared by
    two pods (they clobbered each other's file, and one renamed the other's half-written manifest).
    A tmp name is `<final>.<host>.<pid>.<random>.tmp`: the random part makes it unique, the host and
    pid only say who wrote it. It is created with O_EXCL, so a collision is an error, never a share.

Who may remove a tmp file
    Its writer holds an exclusive `flock` on it from creation to rename (the kernel drops the lock when
    the process dies, however it dies; NFS clients map it to a lock on the server). A sweeper removes a
    tmp file only when it can take that lock: a live writer's file, on this host or another, is never
    removed. The file is created under a `.new` name that no sweeper looks at, locked, and only then
    renamed to its `.tmp` name, so there is no moment at which a sweeper sees it unlocked. On a
    filesystem without locks (`flock` fails) nothing is swept; the litter is ignored by every reader.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import socket
from pathlib import Path

from .fs import AnyPath, RemotePath, put_bytes

TMP_SUFFIX = ".tmp"
_NEW_SUFFIX = ".new"
_HOST = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:32] or "host"


def tmp_path(path: Path) -> Path:
    """A fresh tmp name for `path`, unique across processes, containers and hosts (see the module doc)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(6)}{TMP_SUFFIX}")


class TmpFile:
    """A locked, exclusively created tmp file for `final`; `fd` stays open (and locked) until `close()`."""

    def __init__(self, final: Path):
        self.final = Path(final)
        self.path = tmp_path(self.final)
        new = self.path.with_name("." + self.path.name[: -len(TMP_SUFFIX)] + _NEW_SUFFIX)
        self.fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _lock(self.fd, blocking=True)
            os.rename(new, self.path)
        except BaseException:
            os.close(self.fd)
            Path(new).unlink(missing_ok=True)
            raise

    def close(self) -> None:
        """Release the lock (after the rename into place, or before removing the file)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.close()


def _lock(fd: int, *, blocking: bool) -> bool:
    """Take an exclusive flock; False if another process holds it. Filesystems without locks: True when
    creating (nothing to protect against), and False when sweeping (see `remove_stale_tmp`)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return blocking
        raise


def fsync_dir(directory: Path) -> None:
    # The rename itself is only durable once the directory entry is flushed.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def commit(tmp: Path, final: Path) -> None:
    """fsync `tmp` and rename it over `final` atomically."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def link_exclusive(tmp: Path, final: Path) -> bool:
    """fsync `tmp` and give it the name `final` unless `final` exists (then False: another writer won).

    The first writer wins, so the file under the final name and the receipt written after it by that
    same writer always agree, whichever of two writers of one shard finishes first. `tmp` is removed
    either way. A filesystem without hard links falls back to a check and a rename (not exclusive).
    """
    fsync_file(tmp)
    try:
        os.link(tmp, final)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK):
            raise
        if final.exists():
            tmp.unlink(missing_ok=True)
            return False
        os.replace(tmp, final)
    else:
        tmp.unlink(missing_ok=True)
    fsync_dir(final.parent)
    return True


def atomic_write_bytes(path: AnyPath, data: bytes, before_rename=None) -> None:
    """Write `data` to `path` atomically; `before_rename()` (a failpoint) runs once the tmp is complete.
    On a remote location (storage.fs) the whole object is written in one request: there is no tmp."""
    if isinstance(path, RemotePath):
        if before_rename is not None:
            before_rename()
        put_bytes(path, data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = TmpFile(path)
    try:
        with os.fdopen(os.dup(tmp.fd), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp.path, path)
        tmp.close()
        fsync_dir(path.parent)
    except BaseException:
        tmp.discard()
        raise


def atomic_write_json(path: AnyPath, obj, before_rename=None) -> None:
    atomic_write_bytes(
        path if isinstance(path, RemotePath) else Path(path),
        (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(),
        before_rename,
    )


def is_tmp_of(name: str, final_name: str) -> bool:
    return name.startswith(final_name + ".") and name.endswith(TMP_SUFFIX)


def remove_stale_tmp(final: Path) -> list[Path]:
    """Delete the `.tmp` files of `final` that no live process holds (see the module docstring).

    Only the tmp files of one target are touched, and of those only the unlocked ones: other nodes may
    be writing this very file right now (two pods of one Kubernetes index), and theirs are not stale.
    """
    removed = []
    if isinstance(final, RemotePath):  # no locks there; a killed upload's `.tmp` object is litter no reader reads
        return removed
    final = Path(final)
    if not final.parent.is_dir():
        return removed
    for p in final.parent.iterdir():
        if not is_tmp_of(p.name, final.name):
            continue
        try:
            fd = os.open(p, os.O_RDWR)
        except OSError:  # gone already, or not ours to open
            continue
        try:
            if _lock(fd, blocking=False):
                p.unlink(missing_ok=True)
                removed.append(p)
        finally:
            os.close(fd)
    return removed
