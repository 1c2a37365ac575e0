"""Waiting on real workers: poll an API object until it reaches a state, with a bounded time."""

import time


def wait_for(client, path: str, done, timeout: float = 90) -> dict:
    """GETs `path` until `done(body)` is true; fails with the last body after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    body = None
    while time.monotonic() < deadline:
        body = client.get(path).json()
        if done(body):
            return body
        time.sleep(0.3)
    raise AssertionError(f"{path} did not reach the expected state within {timeout} s: {body}")
