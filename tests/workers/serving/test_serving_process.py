"""The serving process as `make up` runs it: a real uvicorn subprocess reading the session's Redis registry."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
import redis

from tests.workers.serving.conftest import new_endpoint
from tests.workers.serving.helpers import deployment_record, publish
from workers.storage import LocalFolderStore


def _post(base_url: str, path: str, body: dict, token: str | None) -> tuple[int, bytes, str]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["X-Serving-Token"] = token
    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{base_url}{path}", data=json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - loopback
            return response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get("content-type", "")


@pytest.mark.django_db
def test_the_process_serves_a_deployment_over_http(serving_server, service_env, gpt2_folder):
    token = service_env["SERVING_TOKEN"]
    # The process reads the platform's object store (the local folder under the test data dir).
    store = LocalFolderStore(service_env.get("STORAGE_DIR") or f"{service_env['TUNEHOUSE_DATA_DIR']}/storage")
    prefix = f"tenants/1/models/{new_endpoint()}"
    store.upload_dir(prefix, gpt2_folder)
    endpoint = new_endpoint()
    publish(redis.Redis.from_url(service_env["REDIS_URL"]), deployment_record(endpoint, prefix))

    assert _post(serving_server, "/v1/generate", {"endpoint": endpoint, "prompt": "The"}, None)[0] == 401
    deadline = time.monotonic() + 30
    while True:  # the registry reaches the process within one pub/sub message or one 2 s poll
        status, body, content_type = _post(
            serving_server, "/v1/generate", {"endpoint": endpoint, "prompt": "The", "max_tokens": 8}, token
        )
        if status != 404 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200, body
    assert json.loads(body)["choices"][0]["finish_reason"] in {"stop", "length"}

    status, body, content_type = _post(
        serving_server, "/v1/generate", {"endpoint": endpoint, "prompt": "The", "max_tokens": 8, "stream": True}, token
    )
    assert status == 200 and content_type == "text/event-stream"
    assert body.decode().rstrip().endswith("data: [DONE]")
