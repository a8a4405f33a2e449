"""The manifest (`manifest.json`): the run spec plus the receipts of all shards.

Rebuilt from the shards present by `build_manifest` (idempotent, any process may run it). The
run spec itself lives in `storage.spec`, the shard receipts in `storage.receipt`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import failpoints
from .atomic import atomic_write_json, remove_stale_tmp
from .errors import ForeignShardError, IncompleteRunError, ManifestError, RunWriteError
from .fs import AnyPath, location
from .layout import MANIFEST, RUN_SPEC, SHARD_DIR, parse_shard_name, shard_name
from .receipt import ShardReceipt, receipt_for
from .spec import RunSpec, load_run_spec, read_json

_MANIFEST_TMP = failpoints.declare("manifest.tmp_written", "manifest.json's tmp file is complete, not yet renamed")


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
            "totals": {
                "rows": self.rows,
                "tokens": sum(s.tokens for s in self.shards),
                "trained_tokens": self.trained_tokens,
                "bytes": self.bytes,
                "bytes_per_trained_token": self.bytes / max(self.trained_tokens, 1),
                "mean_topk_mass": self.mean_topk_mass,
            },
        }


def load_manifest(run_dir: AnyPath) -> Manifest:
    run_dir = location(run_dir)
    path = run_dir / MANIFEST
    if not path.exists():
        hint = (
            f"run `pipeline teacher --finalize {run_dir}` once every shard is written"
            if (run_dir / RUN_SPEC).exists()
            else "is it a label-anneal run directory?"
        )
        raise IncompleteRunError(f"{run_dir}: no {MANIFEST}; {hint}")
    d = read_json(path)
    spec = RunSpec.from_dict(d, path)
    try:
        shards = [ShardReceipt.from_dict(s) for s in d["shards"]]
    except (KeyError, TypeError) as e:
        raise ManifestError(
            f"{path}: malformed 'shards' list ({e!r}); rebuild it with `pipeline teacher --finalize {run_dir}`"
        ) from e
    if [s.index for s in shards] != list(range(spec.num_shards)):
        raise ManifestError(
            f"{path}: lists shards {[s.index for s in shards][:10]}..., expected 0..{spec.num_shards - 1}; "
            f"rebuild it with `pipeline teacher --finalize {run_dir}`"
        )
    for s in shards:
        if s.fingerprint != spec.fingerprint:
            raise ManifestError(
                f"{path}: shard {s.name} has fingerprint {s.fingerprint}, the run has "
                f"{spec.fingerprint}; rebuild with `pipeline teacher --finalize {run_dir}`"
            )
    return Manifest(spec=spec, shards=shards, path=path)


def present_shards(run_dir: AnyPath, spec: RunSpec) -> dict[int, AnyPath]:
    """Complete shards of this run present on disk, by index. Files of another shard count are foreign."""
    out = {}
    shard_dir = location(run_dir) / SHARD_DIR
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
                f"Move it out of {shard_dir} (it comes from another run)."
            )
        out[index] = p
    return out


def missing_shards(run_dir: AnyPath, spec: RunSpec) -> list[int]:
    have = present_shards(run_dir, spec)
    return [i for i in range(spec.num_shards) if i not in have]


def build_manifest(run_dir: AnyPath, *, write: bool = True) -> Manifest:
    """(Re)build manifest.json from run.json and the shards present. Requires every shard."""
    run_dir = location(run_dir)
    spec = load_run_spec(run_dir)
    have = present_shards(run_dir, spec)
    missing = [i for i in range(spec.num_shards) if i not in have]
    if missing:
        names = ", ".join(shard_name(i, spec.num_shards) for i in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise IncompleteRunError(
            f"{run_dir}: {len(missing)} of {spec.num_shards} shards missing: {names}{more}. "
            f"Run `pipeline teacher` for those shard indices (e.g. --shard-index {missing[0]}), then finalize again."
        )
    receipts = [receipt_for(have[i], spec) for i in range(spec.num_shards)]
    manifest = Manifest(spec=spec, shards=receipts, path=run_dir / MANIFEST)
    if write:
        # Any number of processes may finalize at once (every array task that sees the last shard, plus a
        # `--finalize` job): each writes its own unique tmp and renames it, and the contents are equal, so
        # readers see the old manifest or a whole new one. A finalizer killed mid-write left a tmp that
        # nobody holds: swept here.
        remove_stale_tmp(run_dir / MANIFEST)
        try:
            atomic_write_json(run_dir / MANIFEST, manifest.to_dict(), before_rename=_MANIFEST_TMP)
        except OSError as e:  # the shards are intact; only the manifest is missing
            raise RunWriteError.from_os_error(
                run_dir / MANIFEST, e, f"run `pipeline teacher --finalize {run_dir}`"
            ) from e
    return manifest


__all__ = ["Manifest", "load_manifest", "build_manifest", "present_shards", "missing_shards"]
