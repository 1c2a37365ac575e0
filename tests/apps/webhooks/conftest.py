"""A real HTTP receiver for webhooks, and the session's real Celery workers with a short retry delay."""

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class WebhookReceiver:
    """Answers each POST with the next status of `statuses` (the last one repeats) and records what came."""

    statuses: list[int]
    url: str = ""
    requests: list[ReceivedRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, request: ReceivedRequest) -> int:
        with self._lock:
            self.requests.append(request)
            return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def received(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self.requests)


def _handler_for(receiver: WebhookReceiver):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = receiver.record(ReceivedRequest(path=self.path, headers=dict(self.headers.items()), body=body))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format, *args):  # noqa: A002 - http.server's signature
            pass

    return Handler


@pytest.fixture
def webhook_receiver():
    """Starts receivers on free loopback ports: `webhook_receiver(500, 200)` fails once, then accepts."""
    servers = []

    def start(*statuses: int) -> WebhookReceiver:
        receiver = WebhookReceiver(statuses=list(statuses or (200,)))
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(receiver))
        receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/tunehouse"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return receiver

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def webhook_workers(service_env, request):
    """The session's real `cpu` and `gpu` workers. When this fixture is the first to start them, retries wait 1 s
    instead of 5 s; when other tests started them already, the tests here still pass, a few seconds slower."""
    service_env.setdefault("WEBHOOK_RETRY_BASE_SECONDS", "1")
    return request.getfixturevalue("celery_workers")
