"""The shard format: run spec, manifest, atomic shard writer, reader and validation.

No model code lives here; torch appears only in `storage.torch_data`.
"""
from .codec import Encoding, tail_from_topk
from .errors import (ForeignShardError, FormatVersionError, IncompleteRunError, ManifestError,
                     ShardCorruptError, StorageError)
from .layout import FORMAT_VERSION, shard_name, shard_path
from .manifest import (Manifest, RunSpec, build_manifest, claim_run_dir, load_manifest, load_run_spec,
                       missing_shards, present_shards)
from .reader import RunReader, SequenceLabels, ShardReader, verify_shard
from .writer import ShardReceipt, ShardWriter

__all__ = [
    "Encoding", "tail_from_topk", "StorageError", "ShardCorruptError", "ForeignShardError", "FormatVersionError",
    "IncompleteRunError", "ManifestError", "FORMAT_VERSION", "shard_name", "shard_path", "Manifest", "RunSpec",
    "build_manifest", "claim_run_dir", "load_manifest", "load_run_spec", "missing_shards", "present_shards",
    "RunReader", "SequenceLabels", "ShardReader", "verify_shard", "ShardReceipt", "ShardWriter",
]
