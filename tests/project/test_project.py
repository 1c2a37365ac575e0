"""The project's layout and settings: stdlib `platform` intact in every process, production checks, settings."""

import json
import os
import platform
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest

from tunehouse.localrun import BIN_DIR, REPO_ROOT

STDLIB_DIR = Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_platform_folder_is_not_a_package():
    assert (REPO_ROOT / "platform" / "tunehouse" / "__init__.py").exists()
    assert not (REPO_ROOT / "platform" / "__init__.py").exists()


def test_stdlib_platform_under_pytest():
    assert Path(platform.__file__).resolve().parent == STDLIB_DIR
    assert platform.system() == "Linux"


def test_project_imports_from_any_folder(tmp_path):
    code = (
        "import platform, tunehouse, apps, workers, pathlib, sysconfig;"
        "stdlib = pathlib.Path(sysconfig.get_paths()['stdlib']).resolve();"
        "assert pathlib.Path(platform.__file__).resolve().parent == stdlib;"
        "assert tunehouse.celery_app.main == 'tunehouse';"
        "print(platform.system())"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Linux"


def test_stdlib_platform_under_celery(service_env):
    # `celery report` prints platform details through the stdlib module; it fails outright if it is shadowed.
    result = subprocess.run(
        [str(BIN_DIR / "celery"), "-A", "tunehouse", "report"],
        cwd=REPO_ROOT,
        env=service_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "platform -> system:Linux" in result.stdout


@pytest.mark.django_db(transaction=True)
def test_stdlib_platform_under_the_asgi_server(asgi_server):
    with urllib.request.urlopen(f"{asgi_server}/healthz", timeout=10) as response:  # noqa: S310 - loopback
        health = json.loads(response.read())
    assert health == {"status": "ok", "python": platform.python_version(), "system": "Linux"}


def _production_env(tmp_path) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in {"SECRET_KEY", "ALLOWED_HOSTS"}}
    env.update(
        DEBUG="false",
        SECRET_KEY="x" * 20 + "-a-long-random-production-secret-" + "y" * 30,
        ALLOWED_HOSTS="tunehouse.example.com",
        TUNEHOUSE_DATA_DIR=str(tmp_path),
    )
    return env


def test_production_mode_passes_check_deploy_without_warnings(tmp_path):
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=REPO_ROOT,
        env=_production_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout


def test_production_mode_refuses_to_start_without_a_secret_key(tmp_path):
    env = _production_env(tmp_path)
    del env["SECRET_KEY"]
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


def test_development_secret_key_is_generated_once_and_kept(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "SECRET_KEY"}
    env.update(DEBUG="true", TUNEHOUSE_DATA_DIR=str(tmp_path))
    code = "import django; django.setup(); from django.conf import settings; print(settings.SECRET_KEY)"
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    first, second = run(), run()
    assert first == second and len(first) >= 50
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0


def test_settings_come_from_the_environment(tmp_path):
    env = dict(os.environ)
    env.update(
        TUNEHOUSE_DATA_DIR=str(tmp_path),
        DATABASE_URL="postgres://u:p@db.internal:5432/tunehouse",
        REDIS_URL="redis://cache.internal:6379/3",
        S3_BUCKET="models",
        S3_ENDPOINT_URL="http://s3.internal:8333",
        ALLOWED_HOSTS="a.example,b.example",
    )
    code = (
        "import django, json; django.setup(); from django.conf import settings as s;"
        "print(json.dumps([s.DATABASES['default']['ENGINE'], s.DATABASES['default']['HOST'], s.CELERY_BROKER_URL,"
        " s.CHANNEL_LAYERS['default']['CONFIG']['hosts'][0]['address'], s.S3_BUCKET, s.ALLOWED_HOSTS]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == [
        "django.db.backends.postgresql",
        "db.internal",
        "redis://cache.internal:6379/3",
        "redis://cache.internal:6379/3",
        "models",
        ["a.example", "b.example"],
    ]


def test_celery_is_configured_for_reliability():
    from tunehouse.celery import app

    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.broker_transport_options["visibility_timeout"] >= 6 * 3600
    assert app.amqp.router.route({}, "workers.tasks.training.run_training_job")["queue"].name == "gpu"
    assert app.amqp.router.route({}, "workers.tasks.datasets.validate_file")["queue"].name == "cpu"
    # A job's data is tokenized on `cpu` before it takes an accelerator; webhooks are `cpu` work too.
    assert app.amqp.router.route({}, "workers.tasks.preparation.prepare_job_data")["queue"].name == "cpu"
    assert app.amqp.router.route({}, "workers.tasks.webhooks.deliver_webhook")["queue"].name == "cpu"
