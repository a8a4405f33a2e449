"""Errors raised by the shard format. Every message names the file and says what to do."""


class StorageError(Exception):
    """Base class: something about a run directory or shard is wrong."""


class ShardCorruptError(StorageError):
    """A shard is truncated, unreadable, or its checksum does not match its receipt."""


class ForeignShardError(StorageError):
    """A shard (or run directory) belongs to a different run: its fingerprint differs."""


class FormatVersionError(StorageError):
    """The run was written by an incompatible version of the shard format."""


class IncompleteRunError(StorageError):
    """Shards are missing, or the manifest has not been written yet."""


class ManifestError(StorageError):
    """manifest.json or run.json is missing fields, malformed, or disagrees with the shards."""


class RunWriteError(StorageError):
    """A file of a run (shard, receipt, run.json, manifest) could not be written: disk full, permissions,
    an I/O error. Nothing partial is left under a final name; the message names the file and what to do."""

    @classmethod
    def from_os_error(cls, path, error: OSError, then: str) -> "RunWriteError":
        return cls(
            f"{path}: could not be written ({error.strerror or error}); nothing partial was kept under its "
            f"final name. Free space on that filesystem (or fix the cause), then {then}"
        )


class OpenFilesLimitError(StorageError):
    """The process ran out of file descriptors (EMFILE / ENFILE) while opening a shard. The shard is fine;
    the limit is too low for the files this process holds open."""
