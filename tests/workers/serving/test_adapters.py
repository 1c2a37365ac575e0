"""LoRA adapter deployments of one base model share it: one PeftModel, one scheduler, a batch per adapter."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.workers.ml.engine_fixtures import train
from tests.workers.ml.test_train import write_training_corpus
from tests.workers.serving.conftest import new_endpoint
from tests.workers.serving.helpers import AsgiClient, deploy, deployment_record

pytestmark = pytest.mark.asyncio
PROMPT = "The old sailor"


@pytest.fixture(scope="module")
def adapter_folders(gpt2_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folders = []
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"adapter-{seed}")
        corpus = write_training_corpus(folder / "corpus.txt", seed=seed)
        run = train(
            str(corpus),
            folder / "adapter",
            mode="lora",
            base_model=str(gpt2_folder),
            lora_export="adapter",
            max_steps=8,
            learning_rate=1e-2,
            seed=seed,
        )
        folders.append(Path(run.result.output_dir))
    return folders


def _reference_text(base: Path, adapter: Path, max_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    model = PeftModel.from_pretrained(model, adapter).eval()
    prompt_ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        output = model.generate(
            input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=max_tokens, do_sample=False
        )
    new_ids = output[0, prompt_ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in new_ids:
        new_ids = new_ids[: new_ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


async def test_two_adapters_share_one_base_and_each_generates_its_own_text(
    make_app, redis_client, upload, gpt2_folder, adapter_folders
):
    expected = [_reference_text(gpt2_folder, folder, 12) for folder in adapter_folders]
    app = make_app()
    client = AsgiClient(app)
    endpoints = [new_endpoint(), new_endpoint()]
    for endpoint, folder in zip(endpoints, adapter_folders, strict=True):
        record = deployment_record(endpoint, upload(folder), adapter=True, base_model_dir=str(gpt2_folder))
        await deploy(app, redis_client, record)

    # Three rounds, each sending one request per adapter at the same moment: the adapters run concurrently on the
    # shared base. (Several greedy requests of one adapter joining its batch at different steps would be compared
    # bit for bit with a lone reference run; on this tiny model a last-bit difference in the attention sums can flip
    # a near-tie, so each adapter has one sequence per round.)
    responses = []
    for _ in range(3):
        responses += await asyncio.gather(
            *(client.generate(endpoint=endpoint, prompt=PROMPT, max_tokens=12, temperature=0) for endpoint in endpoints)
        )

    assert all(response.status == 200 for response in responses), [r.body for r in responses]
    texts = [response.json()["choices"][0]["text"] for response in responses]
    for index in range(len(adapter_folders)):
        assert set(texts[index :: len(adapter_folders)]) == {expected[index]}
    loaded = await client.deployments()
    assert {row["endpoint"] for row in loaded} == set(endpoints)
    assert expected[0] != expected[1]
    assert {row["shared_base"] for row in loaded} == {str(gpt2_folder.resolve())}
