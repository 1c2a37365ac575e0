"""The base-model catalog: its stable ids over the API, staff imports, offline models prepared once, and jobs that
start from each kind of entry through real workers."""

import io
import json
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError

from apps.catalog.models import CatalogModel
from apps.catalog.services import catalog_prepare_offline
from tests.polling import wait_for
from workers.ml import modeling
from workers.ml.data.samples import write_sample_datasets
from workers.ml.tokenizer_training import train_byte_level_bpe

STABLE_IDS = {"gpt2-tiny", "bert-tiny", "t5-tiny", "gpt2-base", "smollm2-135m-instruct", "minilm-l6-v2"}


def _upload(client, path: str) -> dict:
    stream = io.BytesIO(Path(path).read_bytes())
    stream.name = Path(path).name
    response = client.post("/v1/files", {"purpose": "fine-tune", "file": stream}, format="multipart")
    assert response.status_code == 200, response.content
    return response.json()


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, str]:
    return write_sample_datasets(str(tmp_path_factory.mktemp("samples")))


@pytest.fixture
def offline_models(db):
    """The real offline models in the shared model cache (converted on the first run only, ~25 s)."""
    catalog_prepare_offline()


@pytest.mark.django_db
def test_model_list_shows_every_stable_id_with_its_card(tenant_a):
    response = tenant_a.api().get("/v1/models")
    assert response.status_code == 200
    models = {model["id"]: model for model in response.json()["data"]}
    assert set(models) >= STABLE_IDS
    tiny = models["gpt2-tiny"]
    assert tiny["object"] == "model" and tiny["kind"] == "architecture"
    assert tiny["tasks"] == ["causal_lm", "classification"] and tiny["parameter_count"] > 0
    assert models["gpt2-base"]["parameter_count"] == 124_439_808  # GPT-2 small, tied embeddings counted once
    assert models["t5-tiny"]["tasks"] == ["seq2seq"]
    for model in models.values():
        assert model["licence"] and model["context_length"] > 0 and model["description"]
    missing = tenant_a.api().get("/v1/models/no-such-model")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.django_db
def test_jobs_refuse_a_model_that_cannot_train_the_file(tenant_a, samples):
    client = tenant_a.api()
    upload = _upload(client, samples["sentiment.csv"])
    cases = [
        ({"model": "no-such-model"}, "model", "model_not_found"),
        ({"model": "gpt2-tiny", "hyperparameters": {"mode": "lora"}}, "hyperparameters.mode", None),
        ({"model": "gpt2-tiny", "hyperparameters": {"scheduler": "sideways"}}, "hyperparameters.scheduler", None),
        ({"model": "gpt2-tiny", "hyperparameters": {"base_model": "/etc"}}, "hyperparameters.base_model", None),
        ({"model": "gpt2-tiny", "hyperparameters": {"lr_gamma": 0}}, "hyperparameters.lr_gamma", None),
    ]
    for body, param, code in cases:
        response = client.post("/v1/fine_tuning/jobs", {"training_file": upload["id"], **body}, format="json")
        assert response.status_code == 400, (body, response.content)
        error = response.json()["error"]
        assert error["param"] == param, (body, error)
        if code:
            assert error["code"] == code


@pytest.mark.django_db(transaction=True)
def test_classification_and_seq2seq_jobs_train_from_scratch_through_real_workers(celery_workers, tenant_a, samples):
    client = tenant_a.api()
    sentiment = _upload(client, samples["sentiment.csv"])
    translation = _upload(client, samples["translation.tsv"])
    classifier = client.post(
        "/v1/fine_tuning/jobs",
        {
            "model": "bert-tiny",
            "training_file": sentiment["id"],
            "hyperparameters": {"max_steps": 12, "validation_fraction": 0.2, "init": "xavier_uniform"},
        },
        format="json",
    ).json()
    translator = client.post(
        "/v1/fine_tuning/jobs",
        {
            "model": "t5-tiny",
            "training_file": translation["id"],
            "hyperparameters": {"max_steps": 8, "validation_fraction": 0.1, "generation_max_new_tokens": 8},
        },
        format="json",
    ).json()
    # A seq2seq architecture cannot learn a classification file: refused once the file is known to be one.
    wrong = client.post("/v1/fine_tuning/jobs", {"model": "t5-tiny", "training_file": sentiment["id"]}, format="json")
    if wrong.status_code == 200:  # the file was still being validated: the job fails instead
        wrong_job = wait_for(
            client, f"/v1/fine_tuning/jobs/{wrong.json()['id']}", lambda job: job["status"] == "failed", 120
        )
        assert "seq2seq" in wrong_job["error"]["message"] or "classification" in wrong_job["error"]["message"]
    else:
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "training_file"

    for job_id in (classifier["id"], translator["id"]):
        job = wait_for(
            client,
            f"/v1/fine_tuning/jobs/{job_id}",
            lambda job: job["status"] in {"succeeded", "failed", "cancelled"},
            240,
        )
        assert job["status"] == "succeeded", job["error"]
        if job_id == classifier["id"]:
            assert 0 <= job["metrics"]["accuracy"] <= 1 and "f1_macro" in job["metrics"]
            refused = client.post(f"/v1/fine_tuning/jobs/{job_id}/generate", {"prompt": "hi"}, format="json")
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "not_a_generative_model"
        else:
            assert 0 <= job["metrics"]["bleu"] <= 100 and "chrf" in job["metrics"] and "rougeL" in job["metrics"]
        events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", {"limit": 100}).json()["data"]
        assert any(event["message"].startswith("Evaluation at step") for event in events)


@pytest.mark.django_db
def test_staff_import_adds_a_safetensors_folder_and_refuses_unsafe_ones(tmp_path, settings):
    settings.MODEL_CACHE_DIR = tmp_path / "cache"
    folder = tmp_path / "my-model"
    tokenizer = train_byte_level_bpe(["hello world, hello models"] * 20, vocab_size=300)
    model = modeling.build_from_scratch(
        architecture="gpt2", size="tiny", task="causal_lm", vocab_size=len(tokenizer), max_length=64, init="normal"
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    call_command("import_model", str(folder), "--id", "house-gpt", "--licence", "MIT", stdout=io.StringIO())
    entry = CatalogModel.objects.get(model_id="house-gpt")
    assert entry.kind == "pretrained" and entry.licence == "MIT" and entry.context_length == 64
    assert "causal_lm" in entry.tasks and entry.parameter_count == modeling.count_parameters(model)
    assert (Path(settings.MODEL_CACHE_DIR) / "house-gpt" / "config.json").is_file()

    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CommandError, match="run code"):
        call_command("import_model", str(folder), "--id", "house-gpt-2", "--licence", "MIT")
    (folder / "pytorch_model.bin").unlink()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(CommandError, match="trust_remote_code"):
        call_command("import_model", str(folder), "--id", "house-gpt-3", "--licence", "MIT")
    assert not CatalogModel.objects.filter(model_id__in=["house-gpt-2", "house-gpt-3"]).exists()


@pytest.mark.slow
@pytest.mark.django_db
def test_offline_models_are_ready_and_preview_with_their_own_tokenizer(offline_models, tenant_a, samples):
    for model_id in ("smollm2-135m-instruct", "minilm-l6-v2"):
        entry = CatalogModel.objects.get(model_id=model_id)
        assert entry.status == "ready" and (Path(settings.MODEL_CACHE_DIR) / model_id / "config.json").is_file()
    assert CatalogModel.objects.get(model_id="smollm2-135m-instruct").parameter_count == 134_515_008
    client = tenant_a.api()
    chat = _upload(client, samples["chat.jsonl"])
    preview = client.get(
        f"/v1/files/{chat['id']}/preview", {"tokenizer": "smollm2-135m-instruct", "limit": 1, "max_length": 256}
    )
    assert preview.status_code == 200, preview.content
    tokens = preview.json()["data"][0]["tokens"]
    texts = [token["text"] for token in tokens]
    # SmolLM2's own chat markers are single tokens of its vocabulary, and only the assistant's turn is trained.
    assert "<|im_start|>" in texts and "<|im_end|>" in texts
    assert any(token["trained"] for token in tokens) and not all(token["trained"] for token in tokens)
    unknown = client.get(f"/v1/files/{chat['id']}/preview", {"tokenizer": "gpt2-tiny"})
    assert unknown.status_code == 404


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_lora_job_on_smollm2_through_real_workers(offline_models, celery_workers, tenant_a, samples):
    client = tenant_a.api()
    chat = _upload(client, samples["chat.jsonl"])
    created = client.post(
        "/v1/fine_tuning/jobs",
        {
            "model": "smollm2-135m-instruct",
            "training_file": chat["id"],
            "hyperparameters": {"max_steps": 2, "batch_size": 2, "max_length": 96, "lora_r": 4},
        },
        format="json",
    )
    assert created.status_code == 200, created.content
    assert created.json()["hyperparameters"]["mode"] == "lora"
    job = wait_for(
        client,
        f"/v1/fine_tuning/jobs/{created.json()['id']}",
        lambda job: job["status"] in {"succeeded", "failed", "cancelled"},
        300,
    )
    assert job["status"] == "succeeded", job["error"]
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", {"limit": 100}).json()["data"]
    start = next(event for event in events if event["message"].startswith("Training smollm2"))
    assert start["data"]["trainable_parameters"] < start["data"]["num_parameters"] / 50
    generated = client.post(
        f"/v1/fine_tuning/jobs/{job['id']}/generate", {"prompt": "What is 2 + 2?", "max_tokens": 8}, format="json"
    )
    assert generated.status_code == 200, generated.content


@pytest.mark.django_db(transaction=True)
def test_a_trained_model_is_evaluated_on_demand_on_another_dataset(celery_workers, tenant_a, samples, tmp_path):
    client = tenant_a.api()
    train = _upload(client, samples["sentiment.csv"])
    created = client.post(
        "/v1/fine_tuning/jobs",
        {"model": "gpt2-tiny", "training_file": train["id"], "hyperparameters": {"max_steps": 10}},
        format="json",
    ).json()
    too_early = client.post(f"/v1/fine_tuning/jobs/{created['id']}/evaluations", {"file": train["id"]}, format="json")
    assert too_early.status_code == 400 and too_early.json()["error"]["code"] == "model_not_ready"
    job = wait_for(
        client, f"/v1/fine_tuning/jobs/{created['id']}", lambda job: job["status"] in {"succeeded", "failed"}, 180
    )
    assert job["status"] == "succeeded", job["error"]

    # Another file of the same labels: held-out reviews written for this test.
    held_out = tmp_path / "held_out.csv"
    held_out.write_text(
        "text,label\n"
        + "".join(f"The service was wonderful {index} and I loved it.,positive\n" for index in range(6))
        + "".join(f"The room was awful {index} and I want my money back.,negative\n" for index in range(6))
    )
    other = _upload(client, str(held_out))
    evaluations = f"/v1/fine_tuning/jobs/{job['id']}/evaluations"
    queued = client.post(evaluations, {"file": other["id"], "max_examples": 10}, format="json")
    assert queued.status_code == 200, queued.content
    assert queued.json()["status"] == "queued" and queued.json()["object"] == "fine_tuning.job.evaluation"
    done = wait_for(
        client, f"{evaluations}/{queued.json()['id']}", lambda body: body["status"] in {"succeeded", "failed"}, 120
    )
    assert done["status"] == "succeeded", done["error"]
    assert done["examples"] == 10 and 0 <= done["metrics"]["accuracy"] <= 1
    assert sum(map(sum, done["metrics"]["confusion_matrix"]["matrix"])) == 10
    assert {"input", "reference", "prediction", "correct"} <= set(done["samples"][0])
    assert [item["id"] for item in client.get(evaluations).json()["data"]] == [queued.json()["id"]]

    # A dataset of another task fails the evaluation with the reason, not the server.
    translation = _upload(client, samples["translation.tsv"])
    wrong = client.post(evaluations, {"file": translation["id"]}, format="json").json()
    failed = wait_for(
        client, f"{evaluations}/{wrong['id']}", lambda body: body["status"] in {"succeeded", "failed"}, 120
    )
    assert failed["status"] == "failed" and failed["error"]["code"] == "training_file_task_mismatch"
    bad_count = client.post(evaluations, {"file": other["id"], "max_examples": 0}, format="json")
    assert bad_count.status_code == 400 and bad_count.json()["error"]["param"] == "max_examples"
