"""The pre-flight estimate: its arithmetic on a real uploaded and validated file against hand-computed values, memory
against a device, the measured-throughput source once a finished job has metrics, the one-click fixes, and the
errors (400 naming the field, 404 for another tenant's file)."""

import json
from collections import Counter

import pytest

from apps.catalog.selectors import catalog_get
from apps.datasets.services import file_upload, file_validate
from apps.jobs.models import JobStatus
from apps.jobs.preflight import (
    memory_estimate,
    model_shape,
    packed_row_count,
    padded_token_count,
    training_row_lengths,
)
from apps.jobs.services import job_create, job_event_record

ESTIMATE = "/v1/fine_tuning/jobs/estimate"

# Six texts of 4 words and six of 12: 96 words. From scratch the tokenizer is trained at run time, so the estimate
# counts the validation report's words (exact here: the lengths span fewer than 20 values).
SHORT_AND_LONG = [" ".join(f"s{i}w{j}" for j in range(4)) for i in range(6)] + [
    " ".join(f"l{i}w{j}" for j in range(12)) for i in range(6)
]


@pytest.fixture
def text_file(tenant_a):
    content = "".join(json.dumps({"text": text}) + "\n" for text in SHORT_AND_LONG).encode()
    file = file_upload(
        tenant=tenant_a.tenant, user=None, filename="short-and-long.jsonl", chunks=[content], purpose="fine-tune"
    )
    return file_validate(file_id=file.pk)


def _estimate(tenant, file, *, target_device="cpu", **hyperparameters):
    body = {"model": "gpt2-tiny", "training_file": file.public_id, "hyperparameters": hyperparameters}
    response = tenant.api().post(ESTIMATE, {**body, "target_device": target_device}, format="json")
    assert response.status_code == 200, response.content
    return response.json()


# --- Pure arithmetic ----------------------------------------------------------------------------------------------


def test_rows_are_truncated_or_cut_into_pieces():
    lengths = Counter({4: 6, 12: 6})
    assert training_row_lengths(lengths, max_length=8, split_long=False) == Counter({4: 6, 8: 6})
    # Plain text: 12 tokens make a piece of 8 and one of 4; a one-token rest is dropped, as the engine drops it.
    assert training_row_lengths(Counter({12: 1, 9: 1}), max_length=8, split_long=True) == Counter({8: 2, 4: 1})


def test_packing_and_padding_by_hand():
    lengths = Counter({4: 6, 12: 6})
    # Each 12 opens a row of 16 with room 4, which one 4 fills: 6 full rows.
    assert packed_row_count(lengths, max_length=16) == 6
    # Two 7s share a row, the third opens another; the five 2s fill the gaps: 31 tokens in 2 rows.
    assert packed_row_count(Counter({7: 3, 2: 5}), max_length=16) == 2
    # Sorted longest first and cut in batches of 4: [12]*4 -> 48, [12, 12, 4, 4] -> 48, [4]*4 -> 16.
    assert padded_token_count(lengths, batch_size=4) == 112


# --- Through the API, on a real uploaded file -----------------------------------------------------------------------


@pytest.mark.django_db
def test_estimate_arithmetic_matches_hand_computed_values(tenant_a, text_file):
    estimate = _estimate(tenant_a, text_file, max_length=16, batch_size=4, n_epochs=2)
    data, steps = estimate["data"], estimate["steps"]
    assert estimate["object"] == "fine_tuning.job.estimate" and estimate["mode"] == "from_scratch"
    assert estimate["task"] == "causal_lm"
    assert data["examples"] == 12 and data["tokens"] == 96 and data["counted_in_tokens"] is False
    assert "word counts" in data["tokens_source"]
    assert data["packing"] is True and data["rows_packed"] == 6 and data["padding_waste_packed"] == 0
    assert data["rows_with_padding"] == 12 and data["padding_waste_with_padding"] == pytest.approx(16 / 112, abs=1e-4)
    assert steps["per_epoch"] == 2 and steps["total"] == 4 and steps["trained_tokens"] == 192
    assert estimate["warnings"] == []

    unpacked = _estimate(tenant_a, text_file, max_length=16, batch_size=4, n_epochs=2, packing=False)
    assert unpacked["data"]["rows"] == 12 and unpacked["steps"]["total"] == 6
    [waste] = unpacked["warnings"]
    assert waste["code"] == "padding_waste" and "14%" in waste["message"]
    assert waste["fixes"][0]["changes"] == [{"field": "packing", "value": True}]

    accumulated = _estimate(
        tenant_a, text_file, max_length=16, batch_size=4, gradient_accumulation_steps=2, packing=False
    )
    assert accumulated["steps"]["per_epoch"] == 2 and accumulated["steps"]["effective_batch_size"] == 8
    assert _estimate(tenant_a, text_file, max_length=16, max_steps=5)["steps"]["total"] == 5

    truncated = _estimate(tenant_a, text_file, max_length=8)
    assert truncated["data"]["tokens"] == 6 * 4 + 6 * 8 and truncated["data"]["truncated_examples"] == 6


@pytest.mark.django_db
def test_memory_fits_on_cpu_for_gpt2_tiny_and_not_on_a_tiny_budget(tenant_a, text_file):
    memory = _estimate(tenant_a, text_file, max_length=16)["memory"]
    assert memory["fits"] is True and memory["target_device"] == "cpu" and memory["precision"] == "fp32"
    assert memory["total_bytes"] == sum(memory["parts"].values()) < memory["device_bytes"]
    assert memory["trainable_parameters"] == memory["parameters"]  # from scratch: every weight trains

    entry = catalog_get(model_id="gpt2-tiny")
    shape = model_shape(
        entry_id=entry.model_id, kind=entry.kind, model_type=entry.model_type, architecture=entry.architecture,
        size=entry.size, folder="", task="causal_lm", vocab_size=512, max_length=128, lora_targets=None,
        parameter_count=entry.parameter_count,
    )  # fmt: skip
    assert shape.hidden_size == 64 and shape.layers == 2 and shape.vocab_size == 512
    arguments = {
        "shape": shape, "mode": "from_scratch", "task": "causal_lm", "optimizer": "adamw", "momentum": 0.9, "lora_r": 8,
        "batch_size": 8, "max_row_length": 128, "precision": "fp32", "device_kind": "cpu",
    }  # fmt: skip
    tiny_budget = memory_estimate(**arguments, device_bytes=1_000_000)
    assert tiny_budget["fits"] is False
    parts = tiny_budget["parts"]
    assert parts["gradients"] == 4 * shape.parameters and parts["optimizer_states"] == 8 * shape.parameters
    assert parts["activations"] == 8 * 128 * 64 * 2 * 17 * 4


@pytest.mark.django_db
def test_a_batch_that_does_not_fit_gets_fixes_keeping_the_effective_batch(tenant_a, text_file):
    estimate = _estimate(tenant_a, text_file, max_length=32768, batch_size=4096, target_device="nvidia-h100")
    assert estimate["memory"]["fits"] is False and estimate["memory"]["precision"] == "bf16"
    [warning] = [warning for warning in estimate["warnings"] if warning["code"] == "does_not_fit"]
    smaller = {change["field"]: change["value"] for change in warning["fixes"][0]["changes"]}
    assert smaller["batch_size"] < 4096 and smaller["batch_size"] * smaller["gradient_accumulation_steps"] == 4096
    assert {"field": "auto_batch_size", "value": True} in warning["fixes"][1]["changes"]
    # Applying the first fix gives an estimate that fits.
    applied = _estimate(
        tenant_a,
        text_file,
        max_length=32768,
        target_device="nvidia-h100",
        batch_size=smaller["batch_size"],
        gradient_accumulation_steps=smaller["gradient_accumulation_steps"],
    )
    assert applied["memory"]["fits"] is True


@pytest.mark.django_db
def test_duration_uses_measured_throughput_once_a_finished_job_has_metrics(tenant_a, tenant_b, text_file):
    before = _estimate(tenant_a, text_file, max_length=16)["duration"]
    assert before["source"] == "flops" and before["description"].startswith("estimated, no measured run yet")

    job = job_create(tenant=tenant_a.tenant, user=None, training_file=text_file, model="gpt2-tiny")
    job_event_record(job=job, message="Training", data={"device": "cpu", "num_parameters": 1, "mode": "from_scratch"})
    for rate in (1000.0, 3000.0, 2000.0):
        job_event_record(job=job, message="step", event_type="metrics", data={"tokens_per_second": rate})
    job.status = JobStatus.SUCCEEDED
    job.save(update_fields=["status"])

    # Throughput is a property of the model and hardware: another tenant's estimate uses it too.
    for tenant in (tenant_a, tenant_b):
        file = text_file
        if tenant is tenant_b:
            content = "".join(json.dumps({"text": text}) + "\n" for text in SHORT_AND_LONG).encode()
            uploaded = file_upload(
                tenant=tenant.tenant, user=None, filename="b.jsonl", chunks=[content], purpose="fine-tune"
            )
            file = file_validate(file_id=uploaded.pk)
        estimate = _estimate(tenant, file, max_length=16)
        duration = estimate["duration"]
        assert duration["source"] == "measured" and duration["measured_jobs"] == 1
        assert duration["tokens_per_second"] == 2000.0 and "measured on 1 recent job" in duration["description"]
        assert duration["seconds"] == pytest.approx(estimate["steps"]["trained_tokens"] / 2000.0, abs=0.1)
        assert job.public_id.encode() not in json.dumps(estimate).encode()
    # Measured on a CPU: a GPU estimate still comes from FLOPs.
    assert _estimate(tenant_a, text_file, max_length=16, target_device="nvidia-h200")["duration"]["source"] == "flops"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"learning_rate": -1.0}}, "hyperparameters.learning_rate"),
        ({"hyperparameters": {"no_such_knob": 1}}, "hyperparameters.no_such_knob"),
        ({"model": "no-such-model"}, "model"),
        ({"target_device": "tpu"}, "target_device"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(tenant_a, text_file, extra, param):
    body = {"model": "gpt2-tiny", "training_file": text_file.public_id, **extra}
    response = tenant_a.api().post(ESTIMATE, body, format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


@pytest.mark.django_db
def test_another_tenants_file_is_not_found(tenant_a, tenant_b, text_file):
    response = tenant_b.api().post(
        ESTIMATE, {"model": "gpt2-tiny", "training_file": text_file.public_id}, format="json"
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found" and response.json()["error"]["param"] == "training_file"
