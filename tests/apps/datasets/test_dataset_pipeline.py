"""Step 2 end to end through real workers: every format uploads and validates, tokenizers train, the token preview
shows exactly which tokens are trained, and bad input fails cleanly with the reason."""

import gzip
import io
import json
from pathlib import Path

import pytest

from apps.datasets.models import File
from tests.polling import wait_for
from workers.ml.data.samples import write_sample_datasets

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, Path]:
    return {name: Path(path) for name, path in write_sample_datasets(str(tmp_path_factory.mktemp("samples"))).items()}


def upload(client, content: bytes, name: str, column_mapping: dict | None = None) -> dict:
    stream = io.BytesIO(content)
    stream.name = name
    data = {"purpose": "fine-tune", "file": stream}
    if column_mapping:
        data["column_mapping"] = json.dumps(column_mapping)
    response = client.post("/v1/files", data, format="multipart")
    assert response.status_code == 200, response.content
    return response.json()


def validated(client, file_id: str) -> dict:
    return wait_for(client, f"/v1/files/{file_id}", lambda f: f["status"] != "uploaded")


@pytest.mark.parametrize(
    ("sample", "gzipped", "expected_format", "expected_task"),
    [
        ("chat.jsonl", False, "chat_jsonl", "chat"),
        ("prompt_completion.jsonl", True, "prompt_completion_jsonl", "prompt_completion"),
        ("sentiment.csv", False, "csv", "classification"),
        ("translation.tsv", False, "tsv", "seq2seq"),
        ("corpus.txt", True, "text", "causal_lm"),
    ],
)
def test_each_format_uploads_and_validates(
    celery_workers, tenant_a, samples, sample, gzipped, expected_format, expected_task
):
    content = samples[sample].read_bytes()
    name = sample
    if gzipped:
        content, name = gzip.compress(content), sample + ".gz"
    file = validated(tenant_a.api(), upload(tenant_a.api(), content, name)["id"])
    report = file["validation_report"]
    assert file["status"] == "processed", report
    assert (file["format"], file["task"]) == (expected_format, expected_task)
    assert report["ok"] and report["rows"] >= 10 and report["error_count"] == 0
    if expected_task == "classification":
        assert set(report["label_distribution"]) == {"positive", "negative", "neutral"}


def test_parquet_with_a_chosen_column_mapping(celery_workers, tenant_a, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "review_body": [f"review number {n} was {'good' if n % 2 else 'bad'}" for n in range(40)],
            "stars": [str(1 + n % 5) for n in range(40)],
            "note": ["x"] * 40,
        }
    )
    pq.write_table(table, tmp_path / "reviews.parquet")
    file = validated(
        tenant_a.api(),
        upload(
            tenant_a.api(),
            (tmp_path / "reviews.parquet").read_bytes(),
            "reviews.parquet",
            column_mapping={"text": "review_body", "label": "stars"},
        )["id"],
    )
    assert file["status"] == "processed", file["validation_report"]
    assert file["task"] == "classification" and file["validation_report"]["rows"] == 40
    assert file["column_mapping"] == {"text": "review_body", "label": "stars"}


@pytest.mark.parametrize(
    ("name", "content", "code"),
    [
        ("junk.jsonl", bytes(range(256)) * 200, "binary_content"),
        (
            "few.jsonl",
            b"".join(json.dumps({"text": f"row {n}"}).encode() + b"\n" for n in range(3)),
            "too_few_examples",
        ),
        ("broken.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n' * 6, "invalid_json"),
        ("bomb.txt.gz", None, "decompressed_too_large"),
    ],
)
def test_bad_input_fails_validation_with_the_reason(celery_workers, tenant_a, name, content, code, settings):
    if content is None:
        # ~70 MB of text compressed to ~140 KB: over the 32 MB cap that tests/plugins/services.py sets for workers.
        content = gzip.compress(b"spam and eggs\n" * 5_000_000, compresslevel=9)
    file = validated(tenant_a.api(), upload(tenant_a.api(), content, name)["id"])
    codes = {error["code"] for error in file["validation_report"]["errors"]}
    assert file["status"] == "error" and code in codes, file["validation_report"]
    assert file["status_details"]


def test_tokenizer_training_report_and_token_preview(celery_workers, tenant_a, samples):
    client = tenant_a.api()
    chat = validated(client, upload(client, samples["chat.jsonl"].read_bytes(), "chat.jsonl")["id"])
    created = client.post(
        "/v1/tokenizers",
        {"training_file": chat["id"], "algorithm": "bpe", "vocab_size": 400, "name": "chat-bpe"},
        format="json",
    ).json()
    tokenizer = wait_for(client, f"/v1/tokenizers/{created['id']}", lambda t: t["status"] != "training")
    assert tokenizer["status"] == "ready", tokenizer["error"]
    report = tokenizer["report"]
    assert report["vocab_size"] <= 400 + 50 and report["fertility"] >= 1 and report["examples"]

    preview = client.get(
        f"/v1/files/{chat['id']}/preview", {"tokenizer": tokenizer["id"], "template": "chatml", "limit": 2}
    ).json()["data"]
    assert len(preview) == 2
    first = preview[0]
    trained = "".join(token["text"] for token in first["tokens"] if token["trained"])
    masked = "".join(token["text"] for token in first["tokens"] if not token["trained"])
    assert first["num_trained"] == sum(token["trained"] for token in first["tokens"]) > 0
    assert "<|im_start|>assistant" in masked and "<|im_end|>" in trained

    everything = client.get(
        f"/v1/files/{chat['id']}/preview", {"tokenizer": tokenizer["id"], "train_on": "all", "limit": 1}
    ).json()["data"][0]
    assert all(token["trained"] for token in everything["tokens"])

    client.post(f"/v1/files/{chat['id']}/validate", {"tokenizer": tokenizer["id"], "max_length": 32}, format="json")
    recounted = wait_for(
        client,
        f"/v1/files/{chat['id']}",
        lambda f: (f["validation_report"].get("token_lengths") or {}).get("tokenizer"),
    )
    lengths = recounted["validation_report"]["token_lengths"]
    assert lengths["tokenizer_used"] and lengths["max_length"] == 32 and lengths["over_max_length"] > 0


def test_preview_and_job_refuse_what_they_cannot_do(celery_workers, tenant_a, samples):
    client = tenant_a.api()
    sentiment = validated(client, upload(client, samples["sentiment.csv"].read_bytes(), "sentiment.csv")["id"])
    # A seq2seq architecture cannot learn labels: refused with the reason, before any job exists.
    job = client.post("/v1/fine_tuning/jobs", {"model": "t5-tiny", "training_file": sentiment["id"]}, format="json")
    assert job.status_code == 400 and job.json()["error"]["code"] == "unsupported_training_data"
    assert "seq2seq" in job.json()["error"]["message"]
    bad = client.get(f"/v1/files/{sentiment['id']}/preview", {"tokenizer": "tok-missing"})
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "tokenizer"
    bad_spec = client.post(
        "/v1/tokenizers", {"training_file": sentiment["id"], "algorithm": "morse", "vocab_size": 500}, format="json"
    )
    assert bad_spec.status_code == 400 and bad_spec.json()["error"]["param"] == "algorithm"
    assert File.objects.for_tenant(tenant_a.tenant).count() == 1


def test_user_data_is_escaped_in_pages_and_neutralised_in_csv(client, tenant_a):
    file = File.objects.create(
        tenant=tenant_a.tenant,
        filename='<script>alert("x")</script>.jsonl',
        bytes=1,
        sha256="c" * 64,
        storage_key="k",
        status="error",
        validation_report={"ok": False, "errors": [{"line": 3, "code": "invalid_json", "message": "=HYPERLINK(1)"}]},
    )
    client.force_login(tenant_a.owner)
    page = client.get(f"/files/{file.public_id}/")
    assert b'<script>alert("x")' not in page.content and b"&lt;script&gt;" in page.content
    exported = client.get(f"/files/{file.public_id}/errors.csv").content.decode()
    assert "'=HYPERLINK(1)" in exported and "\n3,invalid_json,=" not in exported


def test_overlap_with_a_validation_file_is_reported(celery_workers, tenant_a, samples):
    client = tenant_a.api()
    lines = samples["prompt_completion.jsonl"].read_bytes().splitlines(keepends=True)
    train = validated(client, upload(client, b"".join(lines), "train.jsonl")["id"])
    held_out = validated(client, upload(client, b"".join(lines[:12]), "valid.jsonl")["id"])
    client.post(f"/v1/files/{train['id']}/validate", {"validation_file": held_out["id"]}, format="json")
    report = wait_for(client, f"/v1/files/{train['id']}", lambda f: f["validation_report"].get("validation_overlap"))[
        "validation_report"
    ]
    assert report["validation_overlap"]["count"] == 12
    assert report["validation_overlap"]["validation_file"] == held_out["id"]


def test_chat_file_trains_with_the_previewed_labels(celery_workers, tenant_a, samples):
    """A chat file trains from scratch through the real workers, with the loss on assistant turns only."""
    client = tenant_a.api()
    chat = validated(client, upload(client, samples["chat.jsonl"].read_bytes(), "chat.jsonl")["id"])
    job = client.post(
        "/v1/fine_tuning/jobs",
        {
            "model": "gpt2-tiny",
            "training_file": chat["id"],
            "hyperparameters": {"max_steps": 20, "chat_template": "chatml", "train_on": "completions"},
        },
        format="json",
    ).json()
    finished = wait_for(
        client, f"/v1/fine_tuning/jobs/{job['id']}", lambda j: j["status"] in {"succeeded", "failed"}, timeout=180
    )
    assert finished["status"] == "succeeded", finished["error"]
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", {"limit": 100}).json()["data"]
    metrics = [event["data"] for event in events if event["type"] == "metrics"]
    assert metrics and 0 < metrics[0]["trained_tokens_fraction"] < 1
    refused = client.post(
        "/v1/fine_tuning/jobs",
        {"model": "gpt2-tiny", "training_file": chat["id"], "hyperparameters": {"tokenized_cache_dir": "/etc"}},
        format="json",
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "hyperparameters.tokenized_cache_dir"


def test_jobs_report_validation_loss_from_a_file_or_a_seeded_split(celery_workers, tenant_a, samples):
    client = tenant_a.api()
    lines = samples["prompt_completion.jsonl"].read_bytes().splitlines(keepends=True)
    train = validated(client, upload(client, b"".join(lines[8:]), "pc-train.jsonl")["id"])
    held_out = validated(client, upload(client, b"".join(lines[:12]), "pc-valid.jsonl")["id"])
    corpus = validated(client, upload(client, samples["corpus.txt"].read_bytes(), "corpus.txt")["id"])
    with_file = client.post(
        "/v1/fine_tuning/jobs",
        {
            "model": "gpt2-tiny",
            "training_file": train["id"],
            "validation_file": held_out["id"],
            "hyperparameters": {"max_steps": 20, "eval_every_steps": 10},
        },
        format="json",
    ).json()
    assert with_file["validation_file"] == held_out["id"]
    with_split = client.post(
        "/v1/fine_tuning/jobs",
        {
            "model": "gpt2-tiny",
            "training_file": corpus["id"],
            "hyperparameters": {"max_steps": 20, "validation_fraction": 0.2},
        },
        format="json",
    ).json()
    for job in (with_file, with_split):
        done = wait_for(
            client, f"/v1/fine_tuning/jobs/{job['id']}", lambda j: j["status"] in {"succeeded", "failed"}, timeout=180
        )
        assert done["status"] == "succeeded", done["error"]
        assert done["progress"]["train_loss"] is not None
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", {"limit": 100}).json()["data"]
        valid = [
            event["data"]["valid_loss"]
            for event in events
            if event["type"] == "metrics" and event["data"].get("valid_loss") is not None
        ]
        assert valid and all(loss > 0 for loss in valid)
    both = client.post(
        "/v1/fine_tuning/jobs",
        {
            "model": "gpt2-tiny",
            "training_file": train["id"],
            "validation_file": held_out["id"],
            "hyperparameters": {"validation_fraction": 0.1},
        },
        format="json",
    )
    assert both.status_code == 400 and both.json()["error"]["param"] == "hyperparameters.validation_fraction"
