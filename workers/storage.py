"""Object storage behind one small protocol: a local folder for development and single hosts, S3 for the rest.

Training, serving and the web app exchange files (datasets, checkpoints, adapters) only through `ObjectStore`, so
the same code runs from a notebook against a folder and in production against any S3-compatible server. Keys are
"/"-separated relative names such as ``tenants/7/files/file-abc/data.jsonl``; callers put the tenant id in them.

This module must stay free of Django, Celery and the web apps (an import-linter contract checks it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast, runtime_checkable

__all__ = [
    "LocalFolderStore",
    "ObjectNotFound",
    "ObjectStore",
    "S3Store",
    "store_from_env",
    "validate_key",
]

# Copy size for files and downloads: large enough for few syscalls, small enough to keep memory flat.
_COPY_CHUNK = 1024 * 1024
# S3 allows keys of at most 1024 UTF-8 bytes; enforcing it everywhere keeps both backends interchangeable.
_MAX_KEY_BYTES = 1024
# A local write lands in ".<name>.<random>.partial" next to its target before the atomic rename. The suffix is
# reserved so that listings can skip unfinished writes without ever hiding a real object.
_PARTIAL_SUFFIX = ".partial"


class ObjectNotFound(KeyError):
    """No object is stored under the key (raised by open, get_bytes, download_file and size)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        # KeyError's own str() is the repr of the key, which reads badly in logs and error responses.
        return f"no object is stored under {self.key!r}"


@runtime_checkable
class ObjectStore(Protocol):
    """What ML, serving and web code may ask of storage; both backends behave the same for every method."""

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        """Store the concatenated chunks under key without holding them all in memory; returns bytes written.

        If the iterable raises, its exception propagates and nothing is stored (an older object stays intact).
        S3Store consumes the iterable on a transfer thread, so it must not rely on thread-local state.
        """
        ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None: ...

    def open(self, key: str) -> BinaryIO:
        """A streaming reader (use it as a context manager); raises ObjectNotFound."""
        ...

    def get_bytes(self, key: str) -> bytes: ...

    def download_file(self, key: str, path: str | os.PathLike[str]) -> None: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error (deletes are retried by idempotent tasks)."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with prefix; returns how many were removed."""
        ...

    def list_keys(self, prefix: str) -> list[str]:
        """Full keys starting with prefix (plain string prefix, as S3 does), sorted."""
        ...

    def upload_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> list[str]:
        """Store every file under local_dir as prefix/relative/path; returns the keys written, sorted."""
        ...

    def download_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> list[str]:
        """Fetch every object under the folder prefix/ into local_dir/relative/path; returns the keys, sorted."""
        ...


def validate_key(key: str) -> str:
    """Return key unchanged if it is a safe relative object name, else raise ValueError.

    The rules keep a key from escaping a local root (no absolute paths, no "." or ".." segments, no backslashes
    that Windows tools would read as separators) and keep keys identical on both backends (no empty segments,
    which S3 would store but a folder cannot).
    """
    if not isinstance(key, str):
        raise ValueError(f"storage key must be a string, got {type(key).__name__}")
    if not key:
        raise ValueError("storage key must not be empty")
    if "\x00" in key:
        raise ValueError(f"storage key {key!r} contains a NUL character")
    if "\\" in key:
        raise ValueError(f"storage key {key!r} contains a backslash; use '/' between folders")
    if key.startswith("/"):
        raise ValueError(f"storage key {key!r} must be relative, not start with '/'")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"storage key {key!r} has an empty, '.' or '..' segment")
    if len(key.encode("utf-8", "surrogatepass")) > _MAX_KEY_BYTES:
        raise ValueError(f"storage key is longer than {_MAX_KEY_BYTES} bytes")
    return key


def _validate_prefix(prefix: str) -> str:
    """A prefix is a key, optionally ending in "/"; "" means everything (only where the caller allows it)."""
    if prefix == "":
        return prefix
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def _folder_prefix(prefix: str) -> str:
    """Treat prefix as a folder, so that "runs/1" never matches "runs/10/..."."""
    _validate_prefix(prefix)
    if not prefix:
        raise ValueError("a folder prefix must not be empty")
    return prefix if prefix.endswith("/") else prefix + "/"


def _iter_file(path: str | os.PathLike[str]) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            yield chunk


def _fsync_dir(folder: Path) -> None:
    # The rename itself is only durable once the folder entry is on disk; some filesystems refuse O_RDONLY on dirs.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, chunks: Iterable[bytes]) -> int:
    """Write chunks to a temp file beside path, fsync, then rename over path: readers see all or nothing."""
    for attempt in range(5):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_PARTIAL_SUFFIX)
            break
        except FileNotFoundError:
            # A concurrent delete pruned the (then empty) parent folder between mkdir and mkstemp; make it again.
            if attempt == 4:
                raise
    written = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                written += f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return written


class _DirTransfers:
    """upload_dir/download_dir written once on top of put_file/download_file/list_keys."""

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        raise NotImplementedError

    def download_file(self, key: str, path: str | os.PathLike[str]) -> None:
        raise NotImplementedError

    def list_keys(self, prefix: str) -> list[str]:
        raise NotImplementedError

    def upload_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> list[str]:
        folder = _folder_prefix(prefix)
        base = Path(local_dir)
        if not base.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(base))
        keys: list[str] = []
        # Folder links are not followed (a loop would never end); file links are, because model snapshots such as
        # the Hugging Face cache are folders of links into a blob store.
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                if not path.is_file():
                    continue
                key = validate_key(folder + path.relative_to(base).as_posix())
                self.put_file(key, path)
                keys.append(key)
        return sorted(keys)

    def download_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> list[str]:
        folder = _folder_prefix(prefix)
        base = Path(local_dir)
        base.mkdir(parents=True, exist_ok=True)
        base_resolved = base.resolve()
        keys = self.list_keys(folder)
        for key in keys:
            # S3 will hold keys this module would never write (e.g. "a/../b"); refuse to let them leave local_dir.
            relative = validate_key(key[len(folder) :])
            target = base / relative
            if not target.resolve().is_relative_to(base_resolved):
                raise ValueError(f"object {key!r} would be written outside {str(base)!r}")
            self.download_file(key, target)
        return keys


class LocalFolderStore(_DirTransfers):
    """Objects as files under one root folder, written atomically (temp file, fsync, rename)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalFolderStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        validate_key(key)
        if key.rsplit("/", 1)[-1].endswith(_PARTIAL_SUFFIX):
            raise ValueError(f"storage key {key!r} ends in {_PARTIAL_SUFFIX!r}, which marks unfinished local writes")
        # Resolving follows symlinks, so a link planted inside root cannot point a key outside it.
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"storage key {key!r} resolves outside the storage root")
        return path

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        return _atomic_write(self._path(key), chunks)

    def put_bytes(self, key: str, data: bytes) -> None:
        _atomic_write(self._path(key), (data,))

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        _atomic_write(self._path(key), _iter_file(path))

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return cast(BinaryIO, open(path, "rb"))  # noqa: SIM115 - the caller owns and closes the reader
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def download_file(self, key: str, path: str | os.PathLike[str]) -> None:
        with self.open(key) as source:
            _atomic_write(Path(path), iter(lambda: source.read(_COPY_CHUNK), b""))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path.stat().st_size

    def delete(self, key: str) -> None:
        path = self._path(key)
        if not path.is_file():
            return
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._prune_empty_parents(path.parent)

    def _prune_empty_parents(self, folder: Path) -> None:
        # Empty folders are invisible to S3; removing them keeps the two backends looking alike and the tree small.
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone, or raced by a writer): stop climbing
                return
            folder = folder.parent

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("refusing to delete every object: delete_prefix needs a non-empty prefix")
        keys = self.list_keys(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def list_keys(self, prefix: str) -> list[str]:
        _validate_prefix(prefix)
        # Walk only the deepest folder the prefix names fully; the rest of the prefix filters names, like S3 does.
        folder_part = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = (self.root / folder_part).resolve() if folder_part else self.root
        if not start.is_relative_to(self.root) or not start.is_dir():
            return []
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(start):
            relative_dir = Path(dirpath).relative_to(self.root).as_posix()
            dir_key = "" if relative_dir == "." else relative_dir + "/"
            # Skip folders that can neither contain nor lie under the prefix.
            dirnames[:] = [
                d for d in dirnames if (dir_key + d + "/").startswith(prefix) or prefix.startswith(dir_key + d + "/")
            ]
            for name in filenames:
                key = dir_key + name
                if name.startswith(".") and name.endswith(_PARTIAL_SUFFIX):
                    continue
                if key.startswith(prefix) and os.path.isfile(os.path.join(dirpath, name)):
                    keys.append(key)
        return sorted(keys)


class _ChunkReader:
    """A read-only file over an iterator of byte chunks, so boto3 can stream it without joining everything.

    read(n) returns exactly n bytes until the iterator ends: s3transfer turns each read into one multipart part,
    and S3 rejects short parts other than the last.
    """

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        while not self._pending:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                return False
            self._pending = memoryview(chunk).cast("B")
        return True

    def read(self, size: int | None = -1) -> bytes:
        pieces: list[memoryview] = []
        wanted = -1 if size is None or size < 0 else size
        got = 0
        while (wanted < 0 or got < wanted) and self._fill():
            take = len(self._pending) if wanted < 0 else min(wanted - got, len(self._pending))
            pieces.append(self._pending[:take])
            self._pending = self._pending[take:]
            got += take
        self.bytes_read += got
        return b"".join(pieces)


def _is_not_found(error: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(error, ClientError):
        return False
    code = str(error.response.get("Error", {}).get("Code", ""))
    # HEAD responses carry no body, so a missing key shows up as the bare status code.
    return code in ("404", "NoSuchKey", "NotFound")


class S3Store(_DirTransfers):
    """Objects in one bucket of an S3-compatible server (AWS, SeaweedFS, MinIO, ...)."""

    # Streams hold whole parts in memory; 8 MiB parts with one queued upload keep a stream to about three parts
    # while allowing objects up to 80 GB (10,000 parts).
    _STREAM_PART_SIZE = 8 * 1024 * 1024
    # Files are read part by part from disk, so they can afford larger parts and more parallel requests.
    _FILE_PART_SIZE = 16 * 1024 * 1024

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None,
        access_key_id: str | None,
        secret_access_key: str | None,
        region: str = "us-east-1",
        create_bucket: bool = False,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not bucket:
            raise ValueError("S3Store needs a bucket name")
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        config = Config(
            signature_version="s3v4",
            region_name=region,
            # Bucket-in-hostname addressing needs wildcard DNS that self-hosted servers (SeaweedFS) lack.
            s3={"addressing_style": "path"},
            retries={"max_attempts": 8, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
            # boto3 >= 1.36 adds flexible checksums with aws-chunked trailers to every upload by default, which
            # several S3-compatible servers reject; TLS and SigV4 already protect the bytes in transit.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # Missing credentials fall through to boto3's own chain (env, profile, instance role), as AWS deployments want.
        session = boto3.session.Session()
        self._client: Any = session.client(
            "s3",
            endpoint_url=endpoint_url or None,
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=secret_access_key or None,
            region_name=region,
            config=config,
        )
        self._stream_config = TransferConfig(
            multipart_threshold=self._STREAM_PART_SIZE,
            multipart_chunksize=self._STREAM_PART_SIZE,
            max_concurrency=2,
            preferred_transfer_client="classic",
        )
        # Not a constructor argument of boto3's TransferConfig, but read by s3transfer: parts of a stream waiting
        # for an upload slot sit in memory, so allow only one beside the one being uploaded.
        self._stream_config.max_in_memory_upload_chunks = 1
        self._file_config = TransferConfig(
            multipart_threshold=self._FILE_PART_SIZE,
            multipart_chunksize=self._FILE_PART_SIZE,
            max_concurrency=4,
            preferred_transfer_client="classic",
        )
        if create_bucket:
            self._ensure_bucket()

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r})"

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket", "NotFound"):
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":  # AWS rejects an explicit us-east-1 constraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as error:
            # Another worker creating it at the same moment is fine.
            if error.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        validate_key(key)
        reader = _ChunkReader(chunks)
        # A failure aborts the multipart upload inside s3transfer, so no partial object is ever visible.
        self._client.upload_fileobj(reader, self.bucket, key, Config=self._stream_config)
        return reader.bytes_read

    def put_bytes(self, key: str, data: bytes) -> None:
        validate_key(key)
        self._client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        validate_key(key)
        self._client.upload_file(os.fspath(path), self.bucket, key, Config=self._file_config)

    def open(self, key: str) -> BinaryIO:
        validate_key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except Exception as error:
            if _is_not_found(error):
                raise ObjectNotFound(key) from None
            raise
        # botocore's StreamingBody is an IOBase: read(n), iteration and "with" all work, and it streams.
        return cast(BinaryIO, response["Body"])

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as body:
            return body.read()

    def download_file(self, key: str, path: str | os.PathLike[str]) -> None:
        validate_key(key)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Download beside the target and rename, so an interrupted download never leaves a truncated file there.
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=_PARTIAL_SUFFIX)
        os.close(fd)
        try:
            self._client.download_file(self.bucket, key, tmp_name, Config=self._file_config)
            os.replace(tmp_name, target)
        except BaseException as error:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            if isinstance(error, Exception) and _is_not_found(error):
                raise ObjectNotFound(key) from None
            raise

    def _head(self, key: str) -> dict[str, Any] | None:
        validate_key(key)
        try:
            return cast(dict[str, Any], self._client.head_object(Bucket=self.bucket, Key=key))
        except Exception as error:
            if _is_not_found(error):
                return None
            raise

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise ObjectNotFound(key)
        return int(head["ContentLength"])

    def delete(self, key: str) -> None:
        validate_key(key)
        self._client.delete_object(Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("refusing to delete every object: delete_prefix needs a non-empty prefix")
        keys = self.list_keys(prefix)
        deleted = 0
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys per request
            batch = keys[start : start + 1000]
            response = self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
            )
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise OSError(
                    f"S3 refused to delete {len(errors)} of {len(batch)} objects under {prefix!r}; "
                    f"first: {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )
            deleted += len(batch)
        return deleted

    def list_keys(self, prefix: str) -> list[str]:
        _validate_prefix(prefix)
        keys: list[str] = []
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", ()))
        return sorted(keys)


def store_from_env(
    environ: Mapping[str, str] | None = None, *, default_root: str | os.PathLike[str] | None = None
) -> ObjectStore:
    """Build the store the environment describes: S3 when S3_BUCKET is set, else the folder STORAGE_DIR.

    S3 reads S3_ENDPOINT_URL (empty for AWS), S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY and S3_REGION
    (default us-east-1). Without S3_BUCKET, STORAGE_DIR or else default_root names the folder.
    """
    env = os.environ if environ is None else environ
    bucket = (env.get("S3_BUCKET") or "").strip()
    if bucket:
        return S3Store(
            bucket=bucket,
            endpoint_url=env.get("S3_ENDPOINT_URL") or None,
            access_key_id=env.get("S3_ACCESS_KEY_ID") or None,
            secret_access_key=env.get("S3_SECRET_ACCESS_KEY") or None,
            region=env.get("S3_REGION") or "us-east-1",
        )
    root = env.get("STORAGE_DIR") or default_root
    if not root:
        raise ValueError("no object storage configured: set S3_BUCKET for S3 or STORAGE_DIR for a local folder")
    return LocalFolderStore(root)
