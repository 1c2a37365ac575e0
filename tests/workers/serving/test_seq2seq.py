"""Seq2seq batching: a real tiny T5, the runner driven directly and through the serving API."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from tests.workers.serving.conftest import new_endpoint
from tests.workers.serving.helpers import AsgiClient, deploy, deployment_record
from workers.serving.batching import SamplingParams, Sequence, TokenEvent
from workers.serving.seq2seq import Seq2SeqRunner

PROMPTS = [
    "You paint the red dog.",
    "I see the white flower.",
    "The cat",
    "We eat the small green apples in the garden today.",
]


@pytest.fixture(scope="module")
def t5(t5_folder: Path):
    tokenizer = AutoTokenizer.from_pretrained(t5_folder, local_files_only=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(t5_folder, local_files_only=True).eval()
    return model, tokenizer


@pytest.fixture
def make_runner(t5):
    model, tokenizer = t5
    started: list[Seq2SeqRunner] = []

    def make(**options) -> Seq2SeqRunner:
        runner = Seq2SeqRunner(model, tokenizer, **options)
        started.append(runner)
        return runner

    yield make
    for runner in started:
        runner.close()


@dataclass
class Outcome:
    """What one sequence's caller received."""

    events: list[TokenEvent] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def text(self) -> str:
        return "".join(event.text for event in self.events)

    @property
    def finish_reason(self) -> str | None:
        return self.events[-1].finish_reason

    @property
    def completion_tokens(self) -> int:
        return self.events[-1].completion_tokens

    def summary(self) -> tuple[str, str | None, int]:
        return self.text, self.finish_reason, self.completion_tokens


def greedy(max_tokens: int, stop: tuple[str, ...] = ()) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, stop=stop)


def sequences_for(tokenizer, requests: list[tuple[str, SamplingParams]]) -> tuple[list[Sequence], list[Outcome]]:
    outcomes = [Outcome() for _ in requests]
    sequences = []
    for index, (prompt, params) in enumerate(requests):
        outcome = outcomes[index]

        def emit(event: TokenEvent, outcome: Outcome = outcome) -> None:
            outcome.events.append(event)
            if event.finish_reason:
                outcome.done.set()

        sequences.append(Sequence(index, tokenizer(prompt)["input_ids"], params, emit))
    return sequences, outcomes


def generate(runner: Seq2SeqRunner, tokenizer, requests: list[tuple[str, SamplingParams]]) -> list[Outcome]:
    """All requests submitted at once (one batch, as long as they fit ``max_batch_size``)."""
    sequences, outcomes = sequences_for(tokenizer, requests)
    runner.submit(sequences)
    for outcome in outcomes:
        assert outcome.done.wait(60), "no finish event"
    return outcomes


def test_batched_greedy_text_equals_one_at_a_time_and_hugging_face_generate(t5, make_runner):
    model, tokenizer = t5
    runner = make_runner()
    # Room enough for the fixture's translations (14-16 tokens here) to end on EOS, except the two cut short.
    requests = list(zip(PROMPTS, [greedy(30), greedy(5), greedy(12), greedy(30)], strict=True))
    alone = [generate(runner, tokenizer, [request])[0].summary() for request in requests]
    passes_before, batches_before = runner.forward_passes, runner.batches

    batched = [outcome.summary() for outcome in generate(runner, tokenizer, requests)]

    assert batched == alone
    assert runner.batches - batches_before == 1
    # One encoder pass, then one decoder pass per token of the longest row.
    assert runner.forward_passes - passes_before == 1 + max(tokens for _, _, tokens in batched)
    # Each row ends on its own: EOS within max_tokens (counted as a completion token), or max_tokens.
    assert {reason for _, reason, _ in batched} == {"stop", "length"}
    assert batched[1][1:] == ("length", 5)
    for (prompt, params), (text, reason, tokens) in zip(requests, batched, strict=True):
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=params.max_tokens,
                do_sample=False,
            )
        expected = output[0, 1:].tolist()  # without the decoder start token
        assert tokens == len(expected)
        assert reason == ("stop" if expected[-1] == tokenizer.eos_token_id else "length")
        assert text == tokenizer.decode(expected, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_text_streams_token_by_token(t5, make_runner):
    _, tokenizer = t5
    [outcome] = generate(make_runner(), tokenizer, [(PROMPTS[0], greedy(20))])
    assert len(outcome.events) > 3
    assert all(event.finish_reason is None for event in outcome.events[:-1])
    counts = [event.completion_tokens for event in outcome.events]
    assert counts == sorted(set(counts))  # each event carries the tokens so far


def test_a_seeded_sample_gives_the_same_text_alone_and_in_a_batch(t5, make_runner):
    _, tokenizer = t5
    runner = make_runner()
    seeded = (PROMPTS[1], SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7))
    alone = generate(runner, tokenizer, [seeded])[0].summary()
    neighbours = [
        (PROMPTS[0], SamplingParams(max_tokens=24, temperature=1.0, top_p=1.0)),
        (PROMPTS[3], greedy(8)),
        (PROMPTS[2], SamplingParams(max_tokens=3, temperature=0.7, top_p=0.5, seed=1)),
    ]
    in_batch = generate(runner, tokenizer, [neighbours[0], seeded, *neighbours[1:]])[1].summary()
    other_seed = generate(runner, tokenizer, [(seeded[0], SamplingParams(20, 1.0, 0.9, seed=8))])[0].summary()

    assert in_batch == alone
    assert other_seed != alone  # the seed matters, so the equality above is not luck


def test_a_stop_string_ends_only_its_own_row(t5, make_runner):
    _, tokenizer = t5
    runner = make_runner()
    [free] = generate(runner, tokenizer, [(PROMPTS[0], greedy(20))])
    stop = free.text.split(" ")[1]  # a word in the middle of the greedy translation
    others = [(PROMPTS[2], greedy(12)), (PROMPTS[3], greedy(20))]
    alone = [generate(runner, tokenizer, [request])[0].summary() for request in others]

    stopped, *rest = generate(runner, tokenizer, [(PROMPTS[0], greedy(20, stop=(stop,))), *others])

    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]
    assert [outcome.summary() for outcome in rest] == alone


def test_a_request_arriving_mid_generation_starts_at_once_instead_of_waiting_for_the_batch(t5, make_runner):
    _, tokenizer = t5
    runner = make_runner()
    long_request, short_request = (PROMPTS[0], greedy(40)), (PROMPTS[2], greedy(2))
    long_alone, short_alone = (generate(runner, tokenizer, [request])[0] for request in (long_request, short_request))
    assert long_alone.completion_tokens >= 8  # long enough to still be running when the short one is done
    batches_before = runner.batches

    [long_sequence], [long_outcome] = sequences_for(tokenizer, [long_request])
    runner.submit([long_sequence])
    for _ in range(2000):
        if len(long_outcome.events) >= 2:
            break
        threading.Event().wait(0.001)
    [short_sequence], [short_outcome] = sequences_for(tokenizer, [short_request])
    runner.submit([short_sequence])
    assert short_outcome.done.wait(60)
    long_tokens_when_short_finished = len(long_sequence.generated_ids)
    assert long_outcome.done.wait(60)

    # The short request ran in a batch of its own beside the long one, not after it: the long one was still
    # generating when the short one ended. Each gives the same text as alone.
    assert runner.batches - batches_before == 2
    assert long_tokens_when_short_finished < long_outcome.completion_tokens
    assert (long_outcome.summary(), short_outcome.summary()) == (long_alone.summary(), short_alone.summary())
    assert runner.active_sequences == 0


def test_a_cancelled_sequence_does_not_affect_the_others(t5, make_runner):
    _, tokenizer = t5
    runner = make_runner()
    requests = [(PROMPTS[0], greedy(20)), (PROMPTS[1], greedy(20)), (PROMPTS[3], greedy(20))]
    alone = [generate(runner, tokenizer, [request])[0].summary() for request in requests]
    sequences, outcomes = sequences_for(tokenizer, requests)
    middle = sequences[1]
    forward = middle.emit

    def emit_then_leave(event: TokenEvent) -> None:
        forward(event)
        middle.cancel()  # the client goes away after its first token

    middle.emit = emit_then_leave
    runner.submit(sequences)
    for outcome in (outcomes[0], outcomes[2]):
        assert outcome.done.wait(60)

    assert [outcomes[0].summary(), outcomes[2].summary()] == [alone[0], alone[2]]
    assert len(outcomes[1].events) == 1 and not outcomes[1].done.is_set()
    assert runner.active_sequences == 0  # the cancelled row no longer keeps the model busy


def test_a_failing_batch_fails_only_its_sequences_and_the_runner_goes_on(t5, make_runner):
    model, tokenizer = t5
    runner = make_runner(max_batch_size=2)
    good = (PROMPTS[0], greedy(20))
    [expected] = generate(runner, tokenizer, [good])
    sequences, outcomes = sequences_for(tokenizer, [good, good, good])
    sequences[0].prompt_ids = [model.config.vocab_size + 5]  # no such embedding: the encoder pass raises

    runner.submit(sequences)  # batches: [broken, good], then [good]
    for outcome in outcomes:
        assert outcome.done.wait(60)

    assert [outcome.finish_reason for outcome in outcomes[:2]] == ["error", "error"]
    assert outcomes[2].summary() == expected.summary()
    assert generate(runner, tokenizer, [good])[0].summary() == expected.summary()
    assert runner.active_sequences == 0


def test_a_model_with_waiting_or_running_sequences_is_not_idle(t5, make_runner):
    _, tokenizer = t5
    runner = make_runner()
    seen_while_running: list[int] = []
    sequences, outcomes = sequences_for(tokenizer, [(PROMPTS[0], greedy(20)), (PROMPTS[1], greedy(3))])
    first_emit = sequences[0].emit

    def emit_and_look(event: TokenEvent) -> None:
        seen_while_running.append(runner.active_sequences)
        first_emit(event)

    sequences[0].emit = emit_and_look
    with runner.model_lock:  # holds the runner before its encoder pass: the sequences are waiting or in hand
        runner.submit(sequences)
        assert runner.active_sequences == 2
    for outcome in outcomes:
        assert outcome.done.wait(60)

    # Both rows, then only the long one once the short one ended after 3 tokens; a row counts no more from the
    # moment its last event goes out.
    assert seen_while_running[0] == 2 and 1 in seen_while_running and seen_while_running[-1] == 0
    assert runner.active_sequences == 0


@pytest.mark.asyncio
async def test_concurrent_requests_to_a_seq2seq_endpoint_share_forward_passes(
    make_app, redis_client, upload, t5_folder
):
    app = make_app()
    client = AsgiClient(app)
    endpoint = new_endpoint()
    record = deployment_record(endpoint, upload(t5_folder), task="seq2seq")
    await deploy(app, redis_client, record)
    body = {"endpoint": endpoint, "max_tokens": 16, "temperature": 0}
    alone = [(await client.generate(**body, prompt=prompt)).json() for prompt in PROMPTS]  # loads the model
    [before] = await client.deployments()

    responses = await asyncio.gather(*[client.generate(**body, prompt=prompt) for prompt in PROMPTS * 2])

    [after] = await client.deployments()
    assert all(response.status == 200 for response in responses), [response.body for response in responses]
    assert [response.json()["choices"] for response in responses] == [answer["choices"] for answer in alone * 2]
    # One at a time, each request costs an encoder pass plus one decoder pass per token.
    sequential_passes = sum(1 + response.json()["usage"]["completion_tokens"] for response in responses)
    forward_passes = after["forward_passes"] - before["forward_passes"]
    assert forward_passes < sequential_passes / 2, (forward_passes, sequential_passes)
