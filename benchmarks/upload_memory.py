"""Web-process memory while a large file is uploaded through POST /v1/files (goal: peak RSS growth < 64 MB for 1 GB).

Starts a real uvicorn web process with its own Redis and data folder, streams a multipart upload of SIZE_MB from a
generator (the client never holds the file either), and reads the server's peak RSS (VmHWM) from /proc. Baseline in
the same run: the peak growth for a 1 MB upload, so the figure shows what the size of the file adds.

    .venv/bin/python benchmarks/upload_memory.py [SIZE_MB]     # prints one JSON object
"""

import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tunehouse.localrun import RedisServer, free_port, start_asgi_server, stop_process, wait_until  # noqa: E402

CHUNK = b"The quick brown fox jumps over the lazy dog.\n" * 23000  # ~1 MB of valid text


def _memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found")


def _reset_peak(pid: int) -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux ≥ 4.0), so each upload gets its own peak.
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _upload(port: int, api_key: str, size_mb: int) -> float:
    boundary = "tunehouse-benchmark-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\n'
        "Content-Type: text/plain\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    body_length = len(head) + len(CHUNK) * size_mb + len(tail)

    def body():
        yield head
        for _ in range(size_mb):
            yield CHUNK
        yield tail

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    connection.request(
        "POST",
        "/v1/files",
        body=body(),
        headers={
            "Authorization": f"Bearer {api_key}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(body_length),
        },
    )
    response = connection.getresponse()
    payload = response.read()
    if response.status != 200:
        raise RuntimeError(f"upload failed: {response.status} {payload[:300]!r}")
    return time.perf_counter() - started


def main() -> None:
    size_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    with tempfile.TemporaryDirectory(prefix="tunehouse-bench-") as data_dir:
        redis = RedisServer.start(os.path.join(data_dir, "redis"))
        env = dict(
            os.environ,
            TUNEHOUSE_DATA_DIR=data_dir,
            REDIS_URL=redis.url,
            MAX_UPLOAD_BYTES=str(4 * 1024**3),
            DEBUG="true",
        )
        env.pop("DATABASE_URL", None)
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO_ROOT, env=env, check=True)
        created = subprocess.run(
            [sys.executable, "manage.py", "create_tenant", "bench", "--owner-email", "bench@example.test"],
            cwd=REPO_ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        api_key = json.loads(created.stdout)["api_key"]
        port = free_port()
        server = start_asgi_server(port=port, env=env, log_path=Path(data_dir) / "web.log")
        try:
            wait_until(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200,  # noqa: S310
                timeout=60,
                what="uvicorn",
                process=server,
            )
            _upload(port, api_key, 1)  # warm-up: imports and first-request allocations are not the file's doing
            results = {}
            for label, megabytes in (("baseline_1mb", 1), ("large", size_mb)):
                before = _memory_kb(server.pid, "VmRSS")
                _reset_peak(server.pid)
                seconds = _upload(port, api_key, megabytes)
                peak = _memory_kb(server.pid, "VmHWM")
                results[label] = {
                    "upload_mb": megabytes,
                    "seconds": round(seconds, 2),
                    "rss_before_mb": round(before / 1024, 1),
                    "peak_rss_growth_mb": round((peak - before) / 1024, 1),
                }
        finally:
            stop_process(server)
            redis.stop()
    large = results["large"]
    print(
        json.dumps(
            {
                "benchmark": "web process peak RSS growth during one upload",
                **results,
                "throughput_mb_per_s": round(large["upload_mb"] / large["seconds"], 1),
                "goal_peak_rss_growth_mb": 64,
                "goal_met": large["peak_rss_growth_mb"] < 64,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
