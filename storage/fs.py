"""Where a run directory lives: a local path, or a URI on an object store or other filesystem.

    location("runs/r1")                  -> pathlib.Path (today's code path: os.replace / link / fsync)
    location("s3://bucket/runs/r1")      -> RemotePath over pyarrow.fs.S3FileSystem
    location("gs://bucket/runs/r1")      -> RemotePath over pyarrow.fs.GcsFileSystem
    location("hdfs://namenode:8020/r1")  -> RemotePath over pyarrow.fs.HadoopFileSystem (needs libhdfs)
    location("memory://r1")              -> a scheme pyarrow has no driver for, through fsspec (if it knows it)

An unknown scheme, credentials written into the URI, or a driver that cannot start is a `LocationError`
raised here, before anything is written. Credentials come from the standard environment only
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / AWS_PROFILE, AWS_ENDPOINT_URL for an
S3-compatible server; GOOGLE_APPLICATION_CREDENTIALS for GCS) and are never recorded: run.json holds no
location at all, and every message shows the URI as the user typed it.

`RemotePath` has the small part of pathlib's API the storage code reads with (`/`, name, parent, with_name,
exists, is_dir, iterdir, read_bytes, read_text); writes go through the functions below, which keep the
storage guarantees without a rename:

- `put_bytes(path, data)`: one whole object (run.json, manifest.json, receipts). An object store creates an
  object only when its upload completes, so a reader sees the old object or the whole new one.
- `put_file_if_absent(local_file, path)`: a finished shard, created under its final name only if nothing is
  there yet (first writer wins, as `os.link` does locally). On S3 with boto3 installed (the `s3` extra) this
  is a conditional PUT (`If-None-Match: *`; AWS S3 has it since 2024-08, as do MinIO and moto): exclusive
  even between hosts, in one PUT up to `MULTIPART_THRESHOLD` bytes, above it a multipart upload completed
  with the same condition and aborted on any error (a killed process never completes it: nothing is listed).
  Elsewhere (GCS, HDFS, S3 without boto3) the file is uploaded under a unique `.tmp` name and then moved
  onto the final name if that is still free: never a partial object under the final name, but two writers
  racing between the check and the move both succeed; their shards are byte-identical (stage 1 is
  deterministic), and if they were not, the reader's size / sha256 check against the receipt says which shard
  to redo. pyarrow exposes no conditional write and no way to abort an upload (its output streams complete
  the upload when closed or garbage-collected), which is why shards never stream straight to an object.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from .errors import StorageError

# pyarrow.fs.FileSystem.from_uri knows these; anything else goes to fsspec, if installed and it knows it.
PYARROW_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
# Above this a shard goes up as a multipart upload (S3's single PUT stops at 5 GiB).
MULTIPART_THRESHOLD = 1 << 30
PART_SIZE = 64 << 20
_URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CREDENTIAL_KEYS = ("access_key", "secret_key", "session_token", "role_arn", "credential", "token")
_HOST = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:32] or "host"


class LocationError(StorageError, ValueError):
    """A run location that cannot be used: unknown scheme, credentials in the URI, no driver."""


def is_uri(value) -> bool:
    return isinstance(value, str) and _URI_RE.match(value) is not None


class RemotePath:
    """A file or directory on a pyarrow filesystem. `str()` is the URI (for messages and configs)."""

    def __init__(self, fs: pafs.FileSystem, path: str, prefix: str, scheme: str, query: str = ""):
        self.fs, self.path, self.prefix, self.scheme, self.query = fs, path.rstrip("/") or "/", prefix, scheme, query

    def _child(self, path: str) -> "RemotePath":
        return RemotePath(self.fs, path, self.prefix, self.scheme, self.query)

    # -- pathlib's names
    def __truediv__(self, other) -> "RemotePath":
        return self._child(f"{self.path.rstrip('/')}/{str(other).strip('/')}")

    def __str__(self) -> str:
        return self.prefix + self.path

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: "RemotePath") -> bool:  # sorted(dir.iterdir()), as for Paths
        return str(self) < str(other)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "RemotePath":
        head = self.path.rstrip("/").rsplit("/", 1)[0]
        return self._child(head or "/")

    def with_name(self, name: str) -> "RemotePath":
        return self.parent / name

    def resolve(self) -> "RemotePath":
        return self

    expanduser = absolute = resolve

    @property
    def object_store(self) -> bool:
        """No directories, no rename: S3 and GCS."""
        return self.scheme in ("s3", "gs", "gcs")

    def _info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except OSError as e:
            raise remote_error(self, e, "read") from e

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def size(self) -> int:
        info = self._info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self}: no such object")
        return info.size

    def iterdir(self):
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except OSError as e:
            raise remote_error(self, e, "list") from e
        for info in sorted(infos, key=lambda i: i.path):
            yield self._child(info.path)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        if self.object_store:  # no directories: a key's prefix exists once an object is under it
            return
        try:
            self.fs.create_dir(self.path, recursive=parents)
        except OSError as e:
            raise remote_error(self, e, "create") from e

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            if not self.exists():
                raise FileNotFoundError(f"{self}: no such object") from e
            raise remote_error(self, e, "read") from e

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError as e:
            if missing_ok and not self.exists():
                return
            raise remote_error(self, e, "delete") from e

    def open_input_file(self):
        """A random-access file (Parquet footers and row groups are read by range requests)."""
        return self.fs.open_input_file(self.path)

    def open_input_stream(self):
        return self.fs.open_input_stream(self.path)


AnyPath = Path | RemotePath


def remote_error(path, e: BaseException, action: str) -> StorageError:
    return StorageError(
        f"{path}: could not {action} ({e}). Check that the store is reachable and the credentials in the "
        f"environment (AWS_*, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS) allow it, then re-run the same "
        f"command: finished shards are kept"
    )


def location(value) -> AnyPath:
    """A run directory (or a file in one) as given on the command line: a URI becomes a RemotePath, anything
    else a local Path. Raises LocationError for a URI that cannot be used, before anything is written."""
    if isinstance(value, (Path, RemotePath)):
        return value
    value = os.fspath(value) if not isinstance(value, str) else value
    m = _URI_RE.match(value)
    if m is None:
        return Path(value)
    scheme = m.group(1).lower()
    if scheme == "file":
        return Path(urlsplit(value).path)
    parts = urlsplit(value)
    query = parse_qs(parts.query)
    if parts.password or any(k in query for k in _CREDENTIAL_KEYS) or (parts.username and scheme in ("s3", "gs")):
        raise LocationError(
            f"{_redact(value)}: credentials in the URI are refused (they would end up in logs and configs); "
            f"give them through the environment instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
            f"GOOGLE_APPLICATION_CREDENTIALS)"
        )
    base = value.partition("?")[0].rstrip("/")
    if scheme in PYARROW_SCHEMES:
        try:
            fs, path = pafs.FileSystem.from_uri(value)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ImportError) as e:
            raise LocationError(
                f"{value}: cannot open this {scheme}:// location ({e}). "
                + (
                    "HDFS needs libhdfs and a Java runtime (HADOOP_HOME, JAVA_HOME, CLASSPATH)"
                    if scheme in ("hdfs", "viewfs")
                    else "Check the URI and the environment"
                )
            ) from e
    else:
        fs, path = _fsspec_filesystem(value, scheme)
    path = path.rstrip("/") or "/"
    prefix = base[: len(base) - len(path)] if base.endswith(path) else f"{scheme}://"
    return RemotePath(fs, path, prefix, scheme, parts.query)


def _fsspec_filesystem(uri: str, scheme: str):
    hint = (
        f"use a local path, s3://, gs://, hdfs:// or a scheme of an installed fsspec driver "
        f"(pyarrow knows {', '.join(PYARROW_SCHEMES)})"
    )
    try:
        import fsspec  # optional extra: fsspec drivers for schemes pyarrow has no driver for
    except ImportError:
        raise LocationError(f"{uri}: unknown scheme {scheme}://; {hint}") from None
    try:
        cls = fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise LocationError(f"{uri}: unknown scheme {scheme}://; {hint}") from None
    except ImportError as e:
        raise LocationError(f"{uri}: the fsspec driver for {scheme}:// is not installed ({e})") from None
    fs = cls()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), cls._strip_protocol(uri)


def _redact(uri: str) -> str:
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.hostname or ''}{parts.path}"


def is_remote(path) -> bool:
    return isinstance(path, RemotePath)


def file_size(path: AnyPath) -> int:
    """Bytes of a file or object; FileNotFoundError when there is none."""
    return path.size() if isinstance(path, RemotePath) else os.path.getsize(path)


def open_binary(path: AnyPath):
    """A sequential binary reader (hashing a whole shard)."""
    return path.open_input_stream() if isinstance(path, RemotePath) else open(path, "rb")


# ------------------------------------------------------------------------------------------- writes


def put_bytes(path: RemotePath, data: bytes) -> None:
    """One whole object, replacing any previous one (run-level JSON files, receipts)."""
    client = _s3_client(path)
    try:
        if client is not None:
            bucket, key = _bucket_key(path)
            client.put_object(Bucket=bucket, Key=key, Body=data)
            return
        if not path.object_store:  # HDFS & co: write a tmp file, then rename (atomic there)
            tmp = path.with_name(_tmp_name(path.name))
            _stream_up(path.fs, tmp.path, data)
            path.fs.move(tmp.path, path.path)
            return
        _stream_up(path.fs, path.path, data)  # small: one PUT at close
    except Exception as e:
        if isinstance(e, StorageError):
            raise
        raise remote_error(path, e, "write") from e


def put_bytes_if_absent(path: RemotePath, data: bytes) -> bool:
    """Create the object unless one exists (then False). Exclusive with a conditional PUT (S3 + boto3)."""
    client = _s3_client(path)
    if client is None:
        if path.exists():
            return False
        put_bytes(path, data)
        return True
    bucket, key = _bucket_key(path)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return True
    except Exception as e:
        if _precondition_failed(e):
            return False
        raise remote_error(path, e, "write") from e


def put_file_if_absent(src: Path, path: RemotePath, before_commit=None) -> bool:
    """Upload the finished local file `src` to `path` unless an object is already there (then False: another
    writer won). See the module docstring for what is exclusive where. `before_commit()` (a failpoint) runs
    once the bytes are uploaded, before the object becomes visible (multipart and tmp-move only)."""
    client = _s3_client(path)
    try:
        if client is not None:
            return _s3_put_file_if_absent(client, src, path, before_commit)
        if path.exists():
            return False
        tmp = path.with_name(_tmp_name(path.name))
        try:
            with open(src, "rb") as f, path.fs.open_output_stream(tmp.path) as out:
                while block := f.read(PART_SIZE):
                    out.write(block)
            if before_commit is not None:
                before_commit()
            if path.exists():
                return False
            path.fs.move(tmp.path, path.path)
            return True
        finally:
            tmp.unlink(missing_ok=True)
    except Exception as e:
        if isinstance(e, StorageError):
            raise
        raise remote_error(path, e, "upload") from e


def _s3_put_file_if_absent(client, src: Path, path: RemotePath, before_commit) -> bool:
    bucket, key = _bucket_key(path)
    size = os.path.getsize(src)
    if size <= MULTIPART_THRESHOLD:
        try:
            with open(src, "rb") as f:
                client.put_object(Bucket=bucket, Key=key, Body=f, IfNoneMatch="*")
            return True
        except Exception as e:
            if _precondition_failed(e):
                return False
            raise
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    try:
        parts = []
        with open(src, "rb") as f:
            n = 1
            while block := f.read(PART_SIZE):
                r = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=block)
                parts.append({"PartNumber": n, "ETag": r["ETag"]})
                n += 1
        if before_commit is not None:
            before_commit()
        try:
            client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}, IfNoneMatch="*"
            )
            return True
        except Exception as e:
            if _precondition_failed(e):
                _abort(client, bucket, key, upload_id)
                return False
            raise
    except BaseException:
        _abort(client, bucket, key, upload_id)
        raise


def _abort(client, bucket, key, upload_id) -> None:
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
    except Exception:  # the store went away: its lifecycle rule cleans up; nothing is listed either way
        pass


def _stream_up(fs, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as out:
        out.write(data)


def _tmp_name(name: str) -> str:
    return f"{name}.{_HOST}.{os.getpid()}.{secrets.token_hex(6)}.tmp"


def _bucket_key(path: RemotePath) -> tuple[str, str]:
    bucket, _, key = path.path.lstrip("/").partition("/")
    return bucket, key


def _precondition_failed(e: BaseException) -> bool:
    resp = getattr(e, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


_CLIENTS: dict = {}


def _s3_client(path: RemotePath):
    """A boto3 S3 client for conditional writes, or None (not S3, or boto3 not installed: the `s3` extra).
    Same credentials and endpoint as pyarrow's: the standard AWS environment, or endpoint_override in the URI."""
    if path.scheme != "s3":
        return None
    try:
        import boto3  # optional extra: `pip install label-anneal[s3]` for conditional writes on S3
        from botocore.config import Config
    except ImportError:
        return None
    query = parse_qs(path.query)
    endpoint = (query.get("endpoint_override") or [None])[0]
    if endpoint and "://" not in endpoint:
        scheme = (query.get("scheme") or ["https"])[0]
        endpoint = f"{scheme}://{endpoint}"
    region = getattr(path.fs, "region", None) or None
    key = (endpoint, os.environ.get("AWS_ENDPOINT_URL"), region, os.getpid())
    if key not in _CLIENTS:
        cfg = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60)
        _CLIENTS[key] = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=cfg)
    return _CLIENTS[key]


__all__ = [
    "AnyPath",
    "LocationError",
    "RemotePath",
    "location",
    "is_remote",
    "is_uri",
    "put_bytes",
    "put_bytes_if_absent",
    "put_file_if_absent",
    "remote_error",
    "file_size",
    "open_binary",
]
