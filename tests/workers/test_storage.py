"""workers.storage against real backends: a folder under tmp_path and a real SeaweedFS S3 server."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.s3server import SeaweedS3Server, s3_server  # noqa: F401 - s3_server is a fixture
from workers.storage import (
    LocalFolderStore,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    store_from_env,
    validate_key,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def _s3_store(server: SeaweedS3Server, bucket: str) -> S3Store:
    return S3Store(
        bucket=bucket,
        endpoint_url=server.endpoint_url,
        access_key_id=server.access_key_id,
        secret_access_key=server.secret_access_key,
        region=server.region,
    )


def _fresh_bucket(server: SeaweedS3Server) -> str:
    return server.make_bucket(f"storage-{uuid.uuid4().hex[:16]}")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalFolderStore(tmp_path / "store")
    # Looked up lazily so that running only the local cases never starts SeaweedFS.
    server: SeaweedS3Server = request.getfixturevalue("s3_server")
    return _s3_store(server, _fresh_bucket(server))


def _chunks(total: int, seed: int = 0) -> Iterator[bytes]:
    """Deterministic pseudo-random bytes in uneven chunk sizes, generated one chunk at a time."""
    produced = 0
    counter = 0
    while produced < total:
        size = min(total - produced, 1 + (counter * 7919 + seed) % 70_000)
        block = hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        yield (block * (size // len(block) + 1))[:size]
        produced += size
        counter += 1


def _digest(chunks: Iterator[bytes]) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    for chunk in chunks:
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


def _files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


# --- round trips ---------------------------------------------------------------------------------------------


def test_both_backends_satisfy_the_protocol(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)


def test_bytes_round_trip_exists_size_and_overwrite(store: ObjectStore) -> None:
    key = "tenants/1/files/file-abc/data.jsonl"
    assert not store.exists(key)
    store.put_bytes(key, b'{"prompt": "hi"}\n')
    assert store.exists(key)
    assert store.size(key) == 17
    assert store.get_bytes(key) == b'{"prompt": "hi"}\n'

    store.put_bytes(key, b"v2")
    assert store.get_bytes(key) == b"v2"
    assert store.size(key) == 2

    store.put_bytes("tenants/1/empty", b"")
    assert store.exists("tenants/1/empty")
    assert store.size("tenants/1/empty") == 0
    assert store.get_bytes("tenants/1/empty") == b""


def test_stream_of_many_chunks_keeps_exact_size_and_hash(store: ObjectStore) -> None:
    total = 20 * MiB + 12_345  # several multipart parts on S3, with a ragged tail
    expected_size, expected_sha = _digest(_chunks(total))

    written = store.put_stream("tenants/1/big.bin", _chunks(total))

    assert written == expected_size == total
    assert store.size("tenants/1/big.bin") == total
    with store.open("tenants/1/big.bin") as reader:
        got_size, got_sha = _digest(iter(lambda: reader.read(MiB), b""))
    assert (got_size, got_sha) == (expected_size, expected_sha)


def test_stream_of_zero_chunks_stores_an_empty_object(store: ObjectStore) -> None:
    assert store.put_stream("tenants/1/nothing", iter(())) == 0
    assert store.get_bytes("tenants/1/nothing") == b""


def test_file_round_trip_and_download_into_new_folders(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "adapter.safetensors"
    payload = b"".join(_chunks(3 * MiB, seed=3))
    source.write_bytes(payload)

    store.put_file("tenants/2/ckpt/adapter.safetensors", source)
    target = tmp_path / "out" / "deeper" / "adapter.safetensors"
    store.download_file("tenants/2/ckpt/adapter.safetensors", target)

    assert target.read_bytes() == payload
    # Downloading again replaces the file rather than appending, and leaves no temp files beside it.
    target.write_bytes(b"stale")
    store.download_file("tenants/2/ckpt/adapter.safetensors", str(target))
    assert target.read_bytes() == payload
    assert _files_under(target.parent) == ["adapter.safetensors"]


def test_open_streams_in_pieces(store: ObjectStore) -> None:
    payload = b"".join(_chunks(3 * MiB + 7, seed=5))
    store.put_bytes("tenants/1/stream.bin", payload)

    pieces = []
    with store.open("tenants/1/stream.bin") as reader:
        first = reader.read(10)
        assert first == payload[:10]
        pieces.append(first)
        while piece := reader.read(64 * 1024):
            assert len(piece) <= 64 * 1024
            pieces.append(piece)
        assert reader.read(10) == b""
    assert b"".join(pieces) == payload


def test_dir_round_trip_with_nested_folders(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "run"
    files = {
        "config.json": b'{"r": 8}',
        "adapter/model.safetensors": b"".join(_chunks(MiB, seed=9)),
        "adapter/tokenizer/vocab.txt": b"a\nb\n",
        "logs/a/b/c/empty.txt": b"",
    }
    for relative, data in files.items():
        path = source / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (source / "empty-folder").mkdir()

    keys = store.upload_dir("tenants/3/runs/1", source)
    assert keys == sorted(f"tenants/3/runs/1/{relative}" for relative in files)
    # A sibling whose name merely starts with the same characters must not come along on download.
    store.put_bytes("tenants/3/runs/10/other.txt", b"not mine")

    target = tmp_path / "restored"
    downloaded = store.download_dir("tenants/3/runs/1/", target)

    assert downloaded == keys
    assert _files_under(target) == sorted(files)
    for relative, data in files.items():
        assert (target / relative).read_bytes() == data


def test_upload_dir_follows_file_links(store: ObjectStore, tmp_path: Path) -> None:
    # Hugging Face snapshots are folders of links into a blob store; the linked bytes are what must be stored.
    blob = tmp_path / "blobs" / "abc123"
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "model.safetensors").symlink_to(blob)

    assert store.upload_dir("tenants/1/base", snapshot) == ["tenants/1/base/model.safetensors"]
    assert store.get_bytes("tenants/1/base/model.safetensors") == b"weights"


# --- listing and deleting ---------------------------------------------------------------------------------------


def _seed_tenants(store: ObjectStore) -> None:
    for key in ("tenants/1/a.txt", "tenants/1/sub/b.txt", "tenants/10/c.txt", "tenants/2/d.txt", "zeta.txt"):
        store.put_bytes(key, key.encode())


def test_list_keys_by_prefix(store: ObjectStore) -> None:
    _seed_tenants(store)

    assert store.list_keys("tenants/1/") == ["tenants/1/a.txt", "tenants/1/sub/b.txt"]
    # A prefix without the slash is a plain string prefix on both backends, exactly as S3 defines it.
    assert store.list_keys("tenants/1") == ["tenants/1/a.txt", "tenants/1/sub/b.txt", "tenants/10/c.txt"]
    assert store.list_keys("tenants/1/s") == ["tenants/1/sub/b.txt"]
    assert store.list_keys("") == sorted(
        ["tenants/1/a.txt", "tenants/1/sub/b.txt", "tenants/10/c.txt", "tenants/2/d.txt", "zeta.txt"]
    )
    assert store.list_keys("tenants/3/") == []
    assert store.list_keys("nowhere/at/all/") == []


def test_delete_and_delete_prefix(store: ObjectStore) -> None:
    _seed_tenants(store)

    store.delete("tenants/2/d.txt")
    store.delete("tenants/2/d.txt")  # already gone: still fine, a retried task may delete twice
    store.delete("never/existed")
    assert not store.exists("tenants/2/d.txt")

    assert store.delete_prefix("tenants/1/") == 2
    assert store.list_keys("") == ["tenants/10/c.txt", "zeta.txt"]
    assert store.delete_prefix("tenants/1/") == 0
    with pytest.raises(ValueError):
        store.delete_prefix("")


def test_delete_prefix_beyond_one_batch(store: ObjectStore) -> None:
    keys = [f"tenants/5/shards/{i:05d}" for i in range(1003)]  # S3 deletes at most 1000 keys per request
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda key: store.put_bytes(key, b"x"), keys))
    store.put_bytes("tenants/5/keep", b"x")

    assert store.list_keys("tenants/5/shards/") == keys
    assert store.delete_prefix("tenants/5/shards/") == 1003
    assert store.list_keys("tenants/5/") == ["tenants/5/keep"]


def test_missing_objects_raise_object_not_found(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("tenants/1/present", b"x")
    missing = "tenants/1/absent"

    assert not store.exists(missing)
    assert not store.exists("tenants/1")  # a "folder" is not an object
    for call in (store.open, store.get_bytes, store.size):
        with pytest.raises(ObjectNotFound) as raised:
            call(missing)
        assert raised.value.key == missing
    with pytest.raises(KeyError):  # ObjectNotFound is a KeyError, so mapping-style handlers catch it
        store.get_bytes("tenants/1")
    target = tmp_path / "dl" / "absent"
    with pytest.raises(ObjectNotFound):
        store.download_file(missing, target)
    assert not target.exists()
    assert _files_under(tmp_path / "dl") == []


# --- keys -----------------------------------------------------------------------------------------------------

BAD_KEYS = ["", "../x", "a/../../b", "a/..", "./a", "a/./b", "/abs", "a//b", "a/", "a\\b", "a\x00b", "x" * 1025]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_validate_key_rejects_unsafe_keys(key: str) -> None:
    with pytest.raises(ValueError):
        validate_key(key)


@pytest.mark.parametrize("key", ["a", "tenants/1/files/file-x/data.jsonl", ".hidden", "a/b..c/..d", "ü/名前.txt"])
def test_validate_key_returns_safe_keys(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize("key", ["../x", "a/../../b", "/abs", "a//b"])
def test_stores_refuse_traversal_keys(store: ObjectStore, tmp_path: Path, key: str) -> None:
    before = _files_under(tmp_path)
    for call in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.put_stream(key, [b"x"]),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.list_keys(key + "/"),
    ):
        with pytest.raises(ValueError):
            call()
    assert _files_under(tmp_path) == before


def test_local_store_refuses_a_symlink_out_of_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = LocalFolderStore(tmp_path / "root")
    (tmp_path / "root" / "tenants").symlink_to(outside, target_is_directory=True)

    with pytest.raises(ValueError):
        store.put_bytes("tenants/1/x", b"x")
    with pytest.raises(ValueError):
        store.get_bytes("tenants/1/x")
    assert list(outside.iterdir()) == []


# --- atomicity ------------------------------------------------------------------------------------------------


def test_local_writes_leave_no_temp_files(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path / "root")
    source = tmp_path / "src.bin"
    source.write_bytes(b"file")
    store.put_bytes("a/b.txt", b"bytes")
    store.put_stream("a/c.bin", _chunks(2 * MiB))
    store.put_file("d.bin", source)
    store.download_file("a/b.txt", tmp_path / "root-copy" / "b.txt")

    assert _files_under(tmp_path / "root") == ["a/b.txt", "a/c.bin", "d.bin"]
    assert _files_under(tmp_path / "root-copy") == ["b.txt"]

    store.delete("a/b.txt")
    store.delete("a/c.bin")
    assert not (tmp_path / "root" / "a").exists()  # emptied folders are pruned, as S3 has none


def test_local_reader_never_sees_a_half_written_object(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path)
    store.put_bytes("model.bin", b"old")
    seen_midway = []

    def slow_chunks() -> Iterator[bytes]:
        yield b"new-part-1;"
        seen_midway.append((store.get_bytes("model.bin"), store.list_keys("")))
        yield b"new-part-2"

    store.put_stream("model.bin", slow_chunks())

    assert seen_midway == [(b"old", ["model.bin"])]
    assert store.get_bytes("model.bin") == b"new-part-1;new-part-2"


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fail_after", [3, 12 * MiB], ids=["early", "after-multipart-began"])
def test_failed_stream_leaves_no_object_and_keeps_the_old_one(
    store: ObjectStore, request: pytest.FixtureRequest, fail_after: int
) -> None:
    def failing_chunks() -> Iterator[bytes]:
        yield from _chunks(fail_after)
        raise _Boom("source went away")

    with pytest.raises(_Boom):
        store.put_stream("tenants/1/new.bin", failing_chunks())
    assert not store.exists("tenants/1/new.bin")

    store.put_bytes("tenants/1/old.bin", b"keep me")
    with pytest.raises(_Boom):
        store.put_stream("tenants/1/old.bin", failing_chunks())
    assert store.get_bytes("tenants/1/old.bin") == b"keep me"
    assert store.list_keys("") == ["tenants/1/old.bin"]

    if isinstance(store, LocalFolderStore):
        assert _files_under(store.root) == ["tenants/1/old.bin"]
    else:
        assert isinstance(store, S3Store)
        # The multipart upload was aborted, not left behind holding storage.
        server: SeaweedS3Server = request.getfixturevalue("s3_server")
        uploads = server.client().list_multipart_uploads(Bucket=store.bucket)
        assert uploads.get("Uploads", []) == []


# --- configuration ------------------------------------------------------------------------------------------


def test_store_from_env_picks_s3_when_a_bucket_is_set(s3_server: SeaweedS3Server, tmp_path: Path) -> None:  # noqa: F811
    bucket = _fresh_bucket(s3_server)
    environ = {
        "S3_BUCKET": bucket,
        "S3_ENDPOINT_URL": s3_server.endpoint_url,
        "S3_ACCESS_KEY_ID": s3_server.access_key_id,
        "S3_SECRET_ACCESS_KEY": s3_server.secret_access_key,
        "STORAGE_DIR": str(tmp_path / "ignored"),
    }
    store = store_from_env(environ, default_root=tmp_path / "also-ignored")

    assert isinstance(store, S3Store)
    assert store.bucket == bucket
    assert store.region == "us-east-1"
    store.put_bytes("k", b"v")
    assert _s3_store(s3_server, bucket).get_bytes("k") == b"v"
    assert not (tmp_path / "ignored").exists()


def test_store_from_env_falls_back_to_a_local_folder(tmp_path: Path) -> None:
    store = store_from_env({"STORAGE_DIR": str(tmp_path / "dir"), "S3_BUCKET": ""})
    assert isinstance(store, LocalFolderStore)
    assert store.root == (tmp_path / "dir").resolve()

    store = store_from_env({}, default_root=tmp_path / "default")
    assert isinstance(store, LocalFolderStore)
    assert store.root == (tmp_path / "default").resolve()

    with pytest.raises(ValueError):
        store_from_env({})


# --- memory -------------------------------------------------------------------------------------------------

_MEMORY_PROBE = textwrap.dedent(
    """
    import hashlib, json, os, resource, sys
    from workers.storage import LocalFolderStore, S3Store

    if os.environ["PROBE_BACKEND"] == "local":
        store = LocalFolderStore(os.environ["PROBE_ROOT"])
    else:
        store = S3Store(
            bucket=os.environ["PROBE_BUCKET"],
            endpoint_url=os.environ["PROBE_ENDPOINT"],
            access_key_id=os.environ["PROBE_KEY"],
            secret_access_key=os.environ["PROBE_SECRET"],
        )
    store.put_stream("warm-up", [b"x" * 1024])  # load lazily imported modules before the baseline

    total = 64 * 1024 * 1024
    digest = hashlib.sha256()

    def chunks():
        sent = 0
        counter = 0
        while sent < total:
            block = hashlib.sha256(counter.to_bytes(8, "big")).digest() * 2048  # 64 KiB
            digest.update(block)
            sent += len(block)
            counter += 1
            yield block

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    written = store.put_stream("big.bin", chunks())
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"written": written, "sha256": digest.hexdigest(), "growth_kib": after - before}))
    """
)


def test_put_stream_memory_stays_bounded(store: ObjectStore, request: pytest.FixtureRequest) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    if isinstance(store, LocalFolderStore):
        env.update(PROBE_BACKEND="local", PROBE_ROOT=str(store.root))
    else:
        assert isinstance(store, S3Store)
        server: SeaweedS3Server = request.getfixturevalue("s3_server")
        env.update(
            PROBE_BACKEND="s3",
            PROBE_BUCKET=store.bucket,
            PROBE_ENDPOINT=server.endpoint_url,
            PROBE_KEY=server.access_key_id,
            PROBE_SECRET=server.secret_access_key,
        )
    # A fresh interpreter, so the peak RSS of earlier tests in this process cannot hide growth.
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["written"] == 64 * MiB
    assert store.size("big.bin") == 64 * MiB
    with store.open("big.bin") as reader:
        assert _digest(iter(lambda: reader.read(MiB), b""))[1] == report["sha256"]
    assert report["growth_kib"] < 32 * 1024, f"peak RSS grew by {report['growth_kib'] / 1024:.1f} MiB"
