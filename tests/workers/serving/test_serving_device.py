"""Where models run: the device and dtype settings, and a bfloat16 model that still batches deterministically."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from tests.workers.serving.conftest import new_endpoint
from tests.workers.serving.helpers import AsgiClient, deploy, deployment_record
from workers.serving.attention import WIDER_CACHE_ATTENTION
from workers.serving.batching import GenerationScheduler, SamplingParams, Sequence, TokenEvent, _new_cache
from workers.serving.config import ServingConfig, cpu_has_native_bfloat16
from workers.serving.loading import load_plain_model, load_tokenizer, model_memory_bytes, place_model
from workers.serving.registry import CAUSAL_LM

PROMPT = "The old sailor"


@pytest.fixture
def without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32)],
)
def test_auto_on_a_cpu_is_bfloat16_where_it_has_bfloat16_instructions_else_float32(
    without_gpu, monkeypatch, avx512_bf16, amx, expected
):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    config = ServingConfig.from_env({})

    assert (config.device, config.dtype) == ("cpu", expected)


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_the_bfloat16_check_agrees_with_the_cpus_own_flags():
    flags = {
        flag
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("flags")
        for flag in line.split(":", 1)[1].split()
    }

    assert cpu_has_native_bfloat16() == bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize(("bfloat16_supported", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_a_gpu_is_bfloat16_where_the_gpu_has_it_else_float16(monkeypatch, bfloat16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bfloat16_supported)

    config = ServingConfig.from_env({"SERVING_DEVICE": "auto", "SERVING_DTYPE": "auto"})

    assert (config.device, config.dtype) == ("cuda", expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_an_explicit_device_and_dtype_are_taken_as_given(dtype):
    name = str(dtype).removeprefix("torch.")

    config = ServingConfig.from_env({"SERVING_DEVICE": "cpu", "SERVING_DTYPE": name})

    assert (config.device, config.dtype) == ("cpu", dtype)


@pytest.mark.parametrize(("variable", "value"), [("SERVING_DEVICE", "gpu"), ("SERVING_DTYPE", "fp8")])
def test_an_unknown_value_is_refused_naming_its_variable(variable, value):
    with pytest.raises(ValueError, match=f"{variable} must be auto, .*'{value}'"):
        ServingConfig.from_env({"SERVING_DEVICE": "cpu", variable: value})


def test_batching_settings_come_from_the_environment_and_bad_ones_stop_the_start():
    config = ServingConfig.from_env(
        {"SERVING_DEVICE": "cpu", "SERVING_MAX_BATCH_SIZE": "16", "SERVING_SEQ2SEQ_GATHER_SECONDS": "0.02"}
    )
    assert (config.max_batch_size, config.seq2seq_gather_seconds) == (16, 0.02)
    assert config.classify_wait_seconds == ServingConfig.classify_wait_seconds  # unset: the default
    for variable, value in (
        ("SERVING_MAX_BATCH_SIZE", "0"),
        ("SERVING_MAX_BATCH_SIZE", "2.5"),
        ("SERVING_CLASSIFY_WAIT_SECONDS", "soon"),
    ):
        with pytest.raises(ValueError, match=f"{variable} must be a positive"):
            ServingConfig.from_env({"SERVING_DEVICE": "cpu", variable: value})


def test_cuda_without_a_gpu_fails_at_start_saying_what_to_set(without_gpu):
    with pytest.raises(RuntimeError, match="SERVING_DEVICE is cuda, but torch sees no CUDA GPU.*set SERVING_DEVICE"):
        ServingConfig.from_env({"SERVING_DEVICE": "cuda"})


class _Request:
    """One sequence submitted straight to a scheduler, and the text its events carried."""

    def __init__(self, tokenizer, index: int, prompt: str, params: SamplingParams) -> None:
        self.text = ""
        self.finished = threading.Event()
        self.sequence = Sequence(index, tokenizer(prompt, add_special_tokens=False)["input_ids"], params, self._emit)

    def _emit(self, event: TokenEvent) -> None:
        self.text += event.text
        if event.finish_reason is not None:
            self.finished.set()


def _wait_for_all(requests: list[_Request]) -> None:
    for request in requests:
        assert request.finished.wait(60), f"sequence {request.sequence.index} did not finish"


@pytest.fixture(scope="module")
def bfloat16_scheduler(gpt2_folder):
    config = ServingConfig.from_env({"SERVING_DEVICE": "cpu", "SERVING_DTYPE": "bfloat16"})
    model = place_model(load_plain_model(gpt2_folder, CAUSAL_LM), device=config.device, dtype=config.dtype)
    scheduler = GenerationScheduler(model, load_tokenizer(gpt2_folder), max_batch_size=8, name="bfloat16")
    yield scheduler
    scheduler.close()


def test_a_seeded_sequence_in_bfloat16_gives_the_same_text_alone_and_in_a_changing_batch(bfloat16_scheduler):
    scheduler = bfloat16_scheduler
    tokenizer = scheduler.tokenizer
    assert next(scheduler.model.parameters()).dtype == torch.bfloat16
    seeded = SamplingParams(max_tokens=32, temperature=1.0, top_p=1.0, seed=99)
    neighbours = [
        ("A cat", SamplingParams(max_tokens=6, temperature=0.0, top_p=1.0)),
        ("Once upon a time, in a village by the sea", SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8)),
        ("The", SamplingParams(max_tokens=40, temperature=1.0, top_p=1.0, seed=5)),
    ]

    alone = _Request(tokenizer, 0, PROMPT, seeded)
    scheduler.submit([alone.sequence])
    _wait_for_all([alone])

    def others() -> list[_Request]:
        return [_Request(tokenizer, index, prompt, params) for index, (prompt, params) in enumerate(neighbours, 1)]

    # Admitted together with others, then joined by others while it runs: their prefills land between its decode
    # steps, and the short ones leave the batch before it finishes.
    together = [_Request(tokenizer, 0, PROMPT, seeded), *others()]
    scheduler.submit([request.sequence for request in together])
    running = _Request(tokenizer, 0, PROMPT, seeded)
    scheduler.submit([running.sequence])
    deadline = time.monotonic() + 30
    while len(running.sequence.generated_ids) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    joining = others()
    scheduler.submit([request.sequence for request in joining])
    _wait_for_all([*together, running, *joining])

    assert alone.text and len(alone.sequence.generated_ids) > 2
    for batched in (together[0], running):
        assert batched.sequence.generated_ids == alone.sequence.generated_ids
        assert batched.text == alone.text


def test_a_bfloat16_model_on_a_cpu_keeps_its_cache_in_float32_and_a_float32_one_is_left_alone(
    bfloat16_scheduler, gpt2_folder
):
    scheduler = bfloat16_scheduler
    assert scheduler.cache_dtype == torch.float32
    assert scheduler.model.config._attn_implementation == WIDER_CACHE_ATTENTION
    input_ids = torch.tensor([scheduler.tokenizer(PROMPT)["input_ids"]])
    with torch.inference_mode():
        outputs = scheduler.model(
            input_ids=input_ids, past_key_values=_new_cache(scheduler.cache_dtype), use_cache=True
        )
    assert outputs.logits.dtype == torch.bfloat16
    assert {layer.keys.dtype for layer in outputs.past_key_values.layers} == {torch.float32}

    float32_model = load_plain_model(gpt2_folder, CAUSAL_LM)
    float32_scheduler = GenerationScheduler(float32_model, scheduler.tokenizer, name="float32")
    try:
        assert float32_scheduler.cache_dtype is None
        assert float32_model.config._attn_implementation == "sdpa"
    finally:
        float32_scheduler.close()


def test_bfloat16_greedy_text_in_a_batch_is_what_the_model_generates_alone_over_a_float32_cache(bfloat16_scheduler):
    scheduler = bfloat16_scheduler
    tokenizer = scheduler.tokenizer
    greedy = SamplingParams(max_tokens=24, temperature=0.0, top_p=1.0)
    prompts = ["The old sailor", "Once upon a time, in a village by the sea, there lived", "A cat", "It was"]
    requests = [_Request(tokenizer, index, prompt, greedy) for index, prompt in enumerate(prompts)]
    scheduler.submit([request.sequence for request in requests])
    _wait_for_all(requests)

    for request in requests:
        input_ids = torch.tensor([request.sequence.prompt_ids])
        with torch.inference_mode():
            output = scheduler.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                past_key_values=_new_cache(torch.float32),
                max_new_tokens=greedy.max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        alone = output[0, input_ids.shape[1] :].tolist()
        assert request.sequence.generated_ids == alone[: len(request.sequence.generated_ids)]
        assert len(request.sequence.generated_ids) == len(alone) or alone[-1] == tokenizer.eos_token_id


@pytest.mark.asyncio
async def test_the_served_model_takes_the_configured_dtype(make_app, monkeypatch, redis_client, upload, gpt2_folder):
    monkeypatch.setenv("SERVING_DEVICE", "cpu")
    monkeypatch.setenv("SERVING_DTYPE", "bfloat16")
    app = make_app()
    endpoint = new_endpoint()
    await deploy(app, redis_client, deployment_record(endpoint, upload(gpt2_folder)))

    response = await AsgiClient(app).generate(endpoint=endpoint, prompt=PROMPT, max_tokens=8, temperature=0)

    assert response.status == 200, response.body
    assert response.json()["choices"][0]["text"]
    served, _ = await app.service.manager.acquire(endpoint)
    try:
        assert {parameter.dtype for parameter in served.runner.model.parameters()} == {torch.bfloat16}
        # The process says what it serves: bf16 weights, and on a CPU a float32 key/value cache.
        (shown,) = [row for row in await AsgiClient(app).deployments() if row["endpoint"] == endpoint]
        assert (shown["device"], shown["dtype"], shown["kv_cache_dtype"]) == ("cpu", "bfloat16", "float32")
        # The memory budget counts what is resident: two bytes a parameter now.
        float32_bytes = model_memory_bytes(load_plain_model(gpt2_folder, CAUSAL_LM))
        assert served.memory_bytes * 2 == float32_bytes
    finally:
        app.service.manager.release(served)
