"""The shard format: run spec, manifest, atomic shard writer, reader and validation.

No model code lives here, and nothing here imports torch (stage 2 turns rows into tensors).
"""

from .capture import MODES, CaptureMode, mode_of
from .codec import Encoding, tail_from_topk
from .errors import (
    ForeignShardError,
    FormatVersionError,
    IncompleteRunError,
    ManifestError,
    OpenFilesLimitError,
    ShardCorruptError,
    StorageError,
)
from .layout import FORMAT_VERSION, shard_name, shard_path
from .manifest import Manifest, build_manifest, load_manifest, missing_shards, present_shards
from .receipt import ShardReceipt, receipt_for, sha256_file, verify_shard
from .run_reader import RunReader
from .shard_reader import SequenceLabels, ShardReader
from .spec import RunSpec, claim_run_dir, load_run_spec
from .writer import ShardWriter

__all__ = [
    "Encoding",
    "tail_from_topk",
    "StorageError",
    "ShardCorruptError",
    "ForeignShardError",
    "FormatVersionError",
    "IncompleteRunError",
    "ManifestError",
    "OpenFilesLimitError",
    "FORMAT_VERSION",
    "shard_name",
    "shard_path",
    "Manifest",
    "RunSpec",
    "build_manifest",
    "claim_run_dir",
    "load_manifest",
    "load_run_spec",
    "missing_shards",
    "present_shards",
    "RunReader",
    "SequenceLabels",
    "ShardReader",
    "verify_shard",
    "ShardReceipt",
    "ShardWriter",
    "CaptureMode",
    "MODES",
    "mode_of",
    "receipt_for",
    "sha256_file",
]
