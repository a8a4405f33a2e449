"""The run spec (`run.json`): every setting that changes what the shards contain.

Its fingerprint (sha256 of the canonical JSON) is repeated in every shard's metadata and receipt,
so a stray shard from another run is detected. `claim_run_dir` writes it first (first writer wins);
a later run into the same directory must have identical settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import failpoints
from .atomic import TmpFile, fsync_dir, remove_stale_tmp
from .errors import ForeignShardError, FormatVersionError, IncompleteRunError, ManifestError, RunWriteError
from .fs import AnyPath, RemotePath, location, put_bytes_if_absent
from .layout import FORMAT_NAME, FORMAT_VERSION, READABLE_FORMAT_VERSIONS, RUN_SPEC

_RUN_SPEC_TMP = failpoints.declare("run_spec.tmp_written", "run.json's tmp file is written, not yet linked")


@dataclass(frozen=True)
class RunSpec:
    teacher: dict  # name_or_path, config_sha256, weights_sha256, dtype
    tokenizer: dict  # hash, vocab_size, eos_token_id, pad_token_id
    vocab_size: int  # the teacher's output dimension (may exceed len(tokenizer))
    k: int
    encoding: dict  # storage.codec.Encoding.to_dict()
    capture: dict  # engine, dtype, mode (storage.capture), ... : anything that changes the stored values
    corpus: dict  # fingerprint, source, fields, packing
    seq_len: int
    num_shards: int
    num_sequences: int | None  # None (version 2): each shard packs its own range; the manifest counts rows
    format_version: int = FORMAT_VERSION

    def identity(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def fingerprint(self) -> str:
        canon = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:32]

    def to_dict(self) -> dict:
        return {"format": FORMAT_NAME, **self.identity(), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict, source: Path | str = "run spec") -> "RunSpec":
        if d.get("format") != FORMAT_NAME:
            raise ManifestError(f"{source}: not a label-anneal run (format={d.get('format')!r})")
        if d.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise FormatVersionError(
                f"{source}: shard format version {d.get('format_version')} is not supported by this "
                f"label-anneal (reads versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}); re-run "
                f"`pipeline teacher` with this version or use the label-anneal release that wrote it"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ManifestError(
                f"{source}: missing field(s) {missing}; the file is damaged or hand-edited. "
                f"Rebuild it with `pipeline teacher --finalize RUN_DIR`"
            )
        spec = cls(**{n: d[n] for n in names})
        if "fingerprint" in d and d["fingerprint"] != spec.fingerprint:
            raise ManifestError(
                f"{source}: the stored fingerprint does not match the settings in the file "
                f"(was it edited by hand?). Restore it or rebuild with `pipeline teacher --finalize RUN_DIR`"
            )
        return spec

    def diff(self, other: "RunSpec") -> list[str]:
        a, b = self.identity(), other.identity()
        out = []
        for key in a:
            if a[key] != b[key]:
                if isinstance(a[key], dict) and isinstance(b[key], dict):
                    for sub in sorted(set(a[key]) | set(b[key])):
                        if a[key].get(sub) != b[key].get(sub):
                            out.append(f"{key}.{sub}: {a[key].get(sub)!r} vs {b[key].get(sub)!r}")
                else:
                    out.append(f"{key}: {a[key]!r} vs {b[key]!r}")
        return out


def read_json(path: AnyPath) -> dict:
    """A run-level JSON file (run.json, manifest.json); damaged JSON is a ManifestError naming the fix."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(
            f"{path}: not valid JSON ({e}); the file is damaged. "
            f"Rebuild it with `pipeline teacher --finalize {path.parent}`"
        ) from e


def load_run_spec(run_dir: AnyPath) -> RunSpec:
    path = location(run_dir) / RUN_SPEC
    if not path.exists():
        raise IncompleteRunError(
            f"{run_dir}: no {RUN_SPEC}; this is not a label-anneal run directory "
            f"(create one with `pipeline teacher --out {run_dir} ...`)"
        )
    return RunSpec.from_dict(read_json(path), path)


def claim_run_dir(run_dir: AnyPath, spec: RunSpec) -> RunSpec:
    """Write run.json if absent (atomically, first writer wins); else require identical settings.

    Re-running with different settings into an existing run directory is an error, never a mix.
    On a remote location run.json is created with a conditional write where the store has one (storage.fs).
    """
    run_dir = location(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_SPEC
    if isinstance(path, RemotePath):
        _RUN_SPEC_TMP(path=str(path))
        put_bytes_if_absent(path, (json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n").encode())
    elif not path.exists():
        # A unique, locked tmp (storage.atomic): two containers that are both PID 1 never share one, and
        # one killed here leaves litter that the next claim sweeps.
        remove_stale_tmp(path)
        tmp = TmpFile(path)
        try:
            with os.fdopen(os.dup(tmp.fd), "w") as f:
                f.write(json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            _RUN_SPEC_TMP(path=str(path))
            os.link(tmp.path, path)  # fails if another process created it first: then compare below
            fsync_dir(run_dir)
        except FileExistsError:
            pass
        except OSError as e:  # disk full: no half-written run.json (or its tmp) is left behind
            raise RunWriteError.from_os_error(path, e, "re-run the same command") from e
        finally:
            tmp.discard()
    existing = load_run_spec(run_dir)
    if existing.fingerprint != spec.fingerprint:
        diffs = [d for d in existing.diff(spec) if not _same_thing(d.split(":", 1)[0], existing, spec)]
        if not diffs:
            # Only the spelling of a path differs (relative vs absolute, another mount point), and the content
            # fingerprints are equal: the same run. The caller continues with the settings already on disk.
            return existing
        raise ForeignShardError(
            f"{run_dir} already holds a run with different settings (existing vs now):\n  "
            + "\n  ".join(diffs[:12])
            + f"\nUse a new --out directory, or delete {run_dir} to start over."
        )
    return existing


def _same_thing(key: str, a: RunSpec, b: RunSpec) -> bool:
    """Whether a differing setting is only another spelling of the same input: a corpus path whose content
    fingerprint is equal, or a model path whose config and weights hashes are equal."""
    if key == "corpus.source":
        return a.corpus.get("fingerprint") is not None and a.corpus.get("fingerprint") == b.corpus.get("fingerprint")
    if key == "teacher.name_or_path":  # a local folder mounted elsewhere (a hub name is a name, not a spelling)
        paths = [os.path.isabs(str(x.teacher.get("name_or_path"))) for x in (a, b)]
        same = [a.teacher.get(k) == b.teacher.get(k) for k in ("config_sha256", "weights_sha256")]
        return all(paths) and all(same) and a.teacher.get("weights_sha256") is not None
    return False


__all__ = ["RunSpec", "claim_run_dir", "load_run_spec", "read_json"]
