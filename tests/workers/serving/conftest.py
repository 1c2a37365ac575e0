"""Tiny real models, trained once per session, stored in the object store the serving process reads."""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path

import pytest
import redis

from tests.workers.ml.engine_fixtures import train
from tests.workers.ml.test_train import write_training_corpus
from workers.ml.config import TrainingConfig
from workers.ml.data.samples import write_sample_datasets
from workers.ml.engine import run_training
from workers.serving.app import ServingApp
from workers.serving.config import ServingConfig
from workers.storage import LocalFolderStore


@pytest.fixture(scope="session")
def storage_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serving-storage")


@pytest.fixture(scope="session")
def store(storage_dir: Path) -> LocalFolderStore:
    return LocalFolderStore(storage_dir)


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("serving-gpt2")
    corpus = write_training_corpus(folder / "corpus.txt")
    run = train(str(corpus), folder / "model", max_steps=60, log_every_steps=20, learning_rate=3e-3)
    assert run.result.output_dir is not None
    return Path(run.result.output_dir)


@pytest.fixture(scope="session")
def classifier_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("serving-bert")
    samples = write_sample_datasets(str(folder / "samples"))
    output = folder / "model"
    config = TrainingConfig(
        train_file=samples["sentiment.csv"],
        output_dir=str(output),
        task="classification",
        architecture="bert",
        max_steps=15,
        learning_rate=3e-3,
        device="cpu",
    )
    run_training(config)
    return output


@pytest.fixture(scope="session")
def t5_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny T5 trained long enough (~20 s on 2 cores) that greedy translations end with EOS before max_tokens."""
    folder = tmp_path_factory.mktemp("serving-t5")
    samples = write_sample_datasets(str(folder / "samples"))
    run = train(
        samples["translation.tsv"],
        folder / "model",
        task="seq2seq",
        architecture="t5",
        max_steps=1000,
        # 5e-3 collapsed on an Intel Xeon (every input gave the same EOS-free text) where it had trained on an AMD
        # EPYC: the runs' rounding differs; 2e-3 trains on both.
        learning_rate=2e-3,
        log_every_steps=250,
    )
    assert run.result.output_dir is not None
    return Path(run.result.output_dir)


@pytest.fixture
def upload(store: LocalFolderStore):
    """Store a model folder under a fresh prefix, as a finished training job does; returns the prefix."""

    def upload_folder(folder: Path) -> str:
        prefix = f"tenants/1/models/{uuid.uuid4().hex[:12]}"
        store.upload_dir(prefix, folder)
        return prefix

    return upload_folder


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["REDIS_URL"])


@pytest.fixture
def make_app(storage_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """A serving app on the session's Redis; several may run at once, like several serving processes."""
    monkeypatch.setenv("STORAGE_DIR", str(storage_dir))
    monkeypatch.delenv("S3_BUCKET", raising=False)
    # These tests compare served text with float32 references; auto would serve bfloat16 on a CPU with bfloat16
    # instructions (test_serving_device covers that). A test that sets SERVING_DTYPE itself overrides this.
    monkeypatch.setenv("SERVING_DTYPE", "float32")
    started: list[ServingApp] = []

    def make(**overrides) -> ServingApp:
        config = ServingConfig.from_env()
        defaults = {
            "cache_dir": tmp_path_factory.mktemp("serving-cache"),
            "instance_id": f"test:{uuid.uuid4().hex[:8]}",
            "registry_poll_seconds": 0.5,
            "threads": 1,
        }
        config = dataclasses.replace(config, **{**defaults, **overrides})
        app = ServingApp(config)
        app.service.start()
        started.append(app)
        return app

    yield make
    for app in started:
        app.service.stop()


def new_endpoint() -> str:
    return f"ep-{uuid.uuid4().hex[:12]}"
