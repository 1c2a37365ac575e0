"""Starts the real services the suite needs before Django reads its settings.

Loaded with `-p tests.plugins.services` (pyproject addopts) so that its wrapper around
`pytest_load_initial_conftests` runs before pytest-django imports the settings: the private Redis and the test
data folder must be in the environment by then. Nothing here is a fake: a real redis-server on a free port.
"""

import os
import shutil
import tempfile

import pytest

from tunehouse.localrun import RedisServer

_redis: RedisServer | None = None
_data_dir: str | None = None


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(early_config, parser, args):
    global _redis, _data_dir
    if os.environ.get("PYTEST_XDIST_WORKER") is None and _redis is None:
        _data_dir = tempfile.mkdtemp(prefix="tunehouse-test-")
        os.environ["TUNEHOUSE_DATA_DIR"] = _data_dir
        os.environ.pop("S3_BUCKET", None)  # storage tests start their own S3 server; the default store is local
        os.environ.setdefault("DEBUG", "true")
        # Small enough that the bad-input corpus's gzip bomb (64 MB of zeros) trips it in a second.
        os.environ["DATASET_MAX_DECOMPRESSED_BYTES"] = str(32 * 1024 * 1024)
        _redis = RedisServer.start(os.path.join(_data_dir, "redis"))
        os.environ["REDIS_URL"] = _redis.url
    return (yield)


def redis_server() -> RedisServer:
    """The session's private Redis (fault tests restart it)."""
    assert _redis is not None, "the services plugin did not start Redis"
    return _redis


def pytest_unconfigure(config):
    global _redis
    if _redis is not None:
        _redis.stop()
        _redis = None
    if _data_dir is not None:
        shutil.rmtree(_data_dir, ignore_errors=True)
