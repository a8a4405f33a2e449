"""The run spec (`run.json`) and the manifest (`manifest.json`).

The spec holds every setting that changes what the shards contain; its fingerprint (sha256 of
the canonical JSON) is repeated in every shard's metadata and receipt, so a stray shard from
another run is detected. The manifest is the spec plus the receipts of all shards, rebuilt from
the shards present by `build_manifest` (idempotent, any process may run it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write_json, fsync_dir, tmp_path
from .errors import ForeignShardError, FormatVersionError, IncompleteRunError, ManifestError, RunWriteError
from .layout import (FORMAT_NAME, FORMAT_VERSION, MANIFEST, RUN_SPEC, SHARD_DIR, parse_shard_name,
                     receipt_path, shard_name)


@dataclass(frozen=True)
class RunSpec:
    teacher: dict          # name_or_path, config_sha256, weights_sha256, dtype
    tokenizer: dict        # hash, vocab_size, eos_token_id, pad_token_id
    vocab_size: int        # the teacher's output dimension (may exceed len(tokenizer))
    k: int
    encoding: dict         # storage.codec.Encoding.to_dict()
    capture: dict          # engine, dtype, mode, ... : anything that changes the stored values
    corpus: dict           # fingerprint, source, fields, packing
    seq_len: int
    num_shards: int
    num_sequences: int
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
        if d.get("format_version") != FORMAT_VERSION:
            raise FormatVersionError(
                f"{source}: shard format version {d.get('format_version')} is not supported by this "
                f"label-anneal (reads version {FORMAT_VERSION}); re-run `pipeline teacher` with this version "
                f"or use the label-anneal release that wrote it")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ManifestError(f"{source}: missing field(s) {missing}; the file is damaged or hand-edited. "
                                f"Rebuild it with `pipeline teacher --finalize RUN_DIR`")
        spec = cls(**{n: d[n] for n in names})
        if "fingerprint" in d and d["fingerprint"] != spec.fingerprint:
            raise ManifestError(f"{source}: the stored fingerprint does not match the settings in the file "
                                f"(was it edited by hand?). Restore it or rebuild with `pipeline teacher --finalize RUN_DIR`")
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e}); the file is damaged. "
                            f"Rebuild it with `pipeline teacher --finalize {path.parent}`") from e


def load_run_spec(run_dir: Path) -> RunSpec:
    path = Path(run_dir) / RUN_SPEC
    if not path.exists():
        raise IncompleteRunError(f"{run_dir}: no {RUN_SPEC}; this is not a label-anneal run directory "
                                 f"(create one with `pipeline teacher --out {run_dir} ...`)")
    return RunSpec.from_dict(_read_json(path), path)


def claim_run_dir(run_dir: Path, spec: RunSpec) -> RunSpec:
    """Write run.json if absent (atomically, first writer wins); else require identical settings.

    Re-running with different settings into an existing run directory is an error, never a mix.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_SPEC
    if not path.exists():
        tmp = tmp_path(path)
        try:
            tmp.write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.link(tmp, path)  # fails if another process created it first: then compare below
            fsync_dir(run_dir)
        except FileExistsError:
            pass
        except OSError as e:  # disk full: no half-written run.json (or its tmp) is left behind
            raise RunWriteError.from_os_error(path, e, "re-run the same command") from e
        finally:
            tmp.unlink(missing_ok=True)
    existing = load_run_spec(run_dir)
    if existing.fingerprint != spec.fingerprint:
        diffs = existing.diff(spec)
        raise ForeignShardError(
            f"{run_dir} already holds a run with different settings (existing vs now):\n  "
            + "\n  ".join(diffs[:12])
            + f"\nUse a new --out directory, or delete {run_dir} to start over.")
    return existing


@dataclass
class Manifest:
    spec: RunSpec
    shards: list = field(default_factory=list)  # list[ShardReceipt], ordered by index
    path: Path | None = None

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def trained_tokens(self) -> int:
        return sum(s.trained_tokens for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def mean_topk_mass(self) -> float:
        t = self.trained_tokens
        return sum(s.topk_mass_sum for s in self.shards) / t if t else float("nan")

    def to_dict(self) -> dict:
        return {
            **self.spec.to_dict(),
            "shards": [s.to_dict() for s in self.shards],
            "totals": {"rows": self.rows, "tokens": sum(s.tokens for s in self.shards),
                       "trained_tokens": self.trained_tokens, "bytes": self.bytes,
                       "bytes_per_trained_token": self.bytes / max(self.trained_tokens, 1),
                       "mean_topk_mass": self.mean_topk_mass},
        }


def load_manifest(run_dir: Path) -> Manifest:
    from .writer import ShardReceipt

    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not path.exists():
        hint = (f"run `pipeline teacher --finalize {run_dir}` once every shard is written"
                if (run_dir / RUN_SPEC).exists() else "is it a label-anneal run directory?")
        raise IncompleteRunError(f"{run_dir}: no {MANIFEST}; {hint}")
    d = _read_json(path)
    spec = RunSpec.from_dict(d, path)
    try:
        shards = [ShardReceipt.from_dict(s) for s in d["shards"]]
    except (KeyError, TypeError) as e:
        raise ManifestError(f"{path}: malformed 'shards' list ({e!r}); rebuild it with "
                            f"`pipeline teacher --finalize {run_dir}`") from e
    if [s.index for s in shards] != list(range(spec.num_shards)):
        raise ManifestError(f"{path}: lists shards {[s.index for s in shards][:10]}..., expected 0..{spec.num_shards - 1}; "
                            f"rebuild it with `pipeline teacher --finalize {run_dir}`")
    for s in shards:
        if s.fingerprint != spec.fingerprint:
            raise ManifestError(f"{path}: shard {s.name} has fingerprint {s.fingerprint}, the run has "
                                f"{spec.fingerprint}; rebuild with `pipeline teacher --finalize {run_dir}`")
    return Manifest(spec=spec, shards=shards, path=path)


def present_shards(run_dir: Path, spec: RunSpec) -> dict[int, Path]:
    """Complete shards of this run present on disk, by index. Files of another shard count are foreign."""
    out = {}
    shard_dir = Path(run_dir) / SHARD_DIR
    if not shard_dir.is_dir():
        return out
    for p in sorted(shard_dir.iterdir()):
        parsed = parse_shard_name(p.name)
        if parsed is None:
            continue
        index, num = parsed
        if num != spec.num_shards:
            raise ForeignShardError(
                f"{p}: belongs to a split into {num} shards, but this run has {spec.num_shards}. "
                f"Move it out of {shard_dir} (it comes from another run).")
        out[index] = p
    return out


def missing_shards(run_dir: Path, spec: RunSpec) -> list[int]:
    have = present_shards(run_dir, spec)
    return [i for i in range(spec.num_shards) if i not in have]


def build_manifest(run_dir: Path, *, write: bool = True) -> Manifest:
    """(Re)build manifest.json from run.json and the shards present. Requires every shard."""
    from .reader import receipt_for

    run_dir = Path(run_dir)
    spec = load_run_spec(run_dir)
    have = present_shards(run_dir, spec)
    missing = [i for i in range(spec.num_shards) if i not in have]
    if missing:
        names = ", ".join(shard_name(i, spec.num_shards) for i in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise IncompleteRunError(
            f"{run_dir}: {len(missing)} of {spec.num_shards} shards missing: {names}{more}. "
            f"Run `pipeline teacher` for those shard indices (e.g. --shard-index {missing[0]}), then finalize again.")
    receipts = [receipt_for(have[i], spec) for i in range(spec.num_shards)]
    manifest = Manifest(spec=spec, shards=receipts, path=run_dir / MANIFEST)
    if write:
        try:
            atomic_write_json(run_dir / MANIFEST, manifest.to_dict())
        except OSError as e:  # the shards are intact; only the manifest is missing
            raise RunWriteError.from_os_error(run_dir / MANIFEST, e,
                                              f"run `pipeline teacher --finalize {run_dir}`") from e
    return manifest


__all__ = ["RunSpec", "Manifest", "claim_run_dir", "load_run_spec", "load_manifest", "build_manifest",
           "present_shards", "missing_shards", "receipt_path"]
