"""The continuous-batching key/value cache: rows join, leave and grow in place, and generation through it matches
Hugging Face ``generate`` one prompt at a time."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers.serving.batching import GenerationScheduler, SamplingParams, Sequence, TokenEvent, _SlottedLayer
from workers.serving.loading import load_tokenizer

HEADS, HEAD_SIZE = 2, 4


class _ReferenceRows:
    """What each row of a layer must hold: its own positions, newest last (the layer left-pads them)."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []  # per row: [heads, positions, head size]
        self.values: list[torch.Tensor] = []

    def check(self, layer: _SlottedLayer) -> None:
        assert layer.keys.shape[0] == len(self.keys)
        width = layer.keys.shape[2]
        for row, (keys, values) in enumerate(zip(self.keys, self.values, strict=True)):
            used = keys.shape[1]
            assert used <= width
            assert torch.equal(layer.keys[row, :, width - used :], keys)
            assert torch.equal(layer.values[row, :, width - used :], values)
        # Padding columns get no attention weight, but weight 0 times a non-finite value would still be NaN.
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


def _states(rows: int, positions: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (rows, HEADS, positions, HEAD_SIZE)
    return torch.randn(shape).to(device), torch.randn(shape).to(device)


@pytest.fixture
def tight_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """No spare room to speak of, so that growing, joining and widening all take the reallocating paths too."""
    monkeypatch.setattr(_SlottedLayer, "spare_positions", 1)
    monkeypatch.setattr(_SlottedLayer, "spare_rows", 1)


def _prefill(rows: int, positions: int, reference: _ReferenceRows, device: str) -> _SlottedLayer:
    layer = _SlottedLayer()
    keys, values = _states(rows, positions, device)
    layer.update(keys, values)
    reference.keys += list(keys)
    reference.values += list(values)
    return layer


def _decode(layer: _SlottedLayer, reference: _ReferenceRows, steps: int) -> None:
    for _ in range(steps):
        keys, values = _states(len(reference.keys), 1, layer.device.type)
        returned_keys, returned_values = layer.update(keys, values)
        assert returned_keys is layer.keys and returned_values is layer.values
        reference.keys = [torch.cat([old, new], 1) for old, new in zip(reference.keys, keys, strict=True)]
        reference.values = [torch.cat([old, new], 1) for old, new in zip(reference.values, values, strict=True)]


def _join(layer: _SlottedLayer, reference: _ReferenceRows, rows: int, positions: int) -> None:
    keys, values = _states(rows, positions, layer.device.type)
    layer.append_rows(keys, values)
    reference.keys += list(keys)
    reference.values += list(values)


def _drop(layer: _SlottedLayer, reference: _ReferenceRows, finished: set[int]) -> None:
    """What the scheduler does: the last kept rows move into the finished rows' places."""
    keep = [row for row in range(len(reference.keys)) if row not in finished]
    remaining = len(keep)
    gaps = [row for row in range(remaining) if row in finished]
    movers = [row for row in keep if row >= remaining]
    device = layer.device
    layer.keep_rows(
        torch.tensor(movers, device=device) if movers else None,
        torch.tensor(gaps, device=device) if gaps else None,
        remaining,
    )
    order = list(range(remaining))
    for gap, mover in zip(gaps, movers, strict=True):
        order[gap] = mover
    reference.keys = [reference.keys[row] for row in order]
    reference.values = [reference.values[row] for row in order]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tight", [False, True], ids=["spare-room", "no-spare-room"])
def test_rows_join_leave_and_grow_with_every_row_keeping_its_own_positions(tight, device, request):
    if tight:
        request.getfixturevalue("tight_layers")
    torch.manual_seed(0)
    reference = _ReferenceRows()
    layer = _prefill(3, 5, reference, device)
    reference.check(layer)
    _decode(layer, reference, 3)
    reference.check(layer)

    _join(layer, reference, 2, 4)  # shorter than the batch: left-padded to its width
    reference.check(layer)
    _decode(layer, reference, 2)
    _join(layer, reference, 1, 15)  # longer than the batch: the batch widens on the left
    reference.check(layer)
    _decode(layer, reference, 2)
    reference.check(layer)

    _drop(layer, reference, {0, 2})  # two gaps, filled by the last two rows
    reference.check(layer)
    _drop(layer, reference, {3})  # the last row: nothing moves
    reference.check(layer)
    # The widest row left is 15 + 2 positions; the rest of the width is padding in every row, and trimming it keeps
    # every row's own positions.
    width = layer.keys.shape[2]
    widest = max(keys.shape[1] for keys in reference.keys)
    layer.trim_left(width - widest)
    assert layer.keys.shape[2] == widest
    reference.check(layer)

    _join(layer, reference, 4, 3)  # into rows that earlier rows used: their stale padding is cleared
    _decode(layer, reference, 70)  # past any spare room
    reference.check(layer)
    assert layer.get_seq_length() == layer.keys.shape[2]


def _greedy_alone(model, prompt_ids: list[int], max_tokens: int, eos_token_id: int | None) -> list[int]:
    input_ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=eos_token_id,
        )
    return output[0, len(prompt_ids) :].tolist()


PROMPTS = [
    ("The old sailor", 30),
    ("A cat", 6),
    ("Once upon a time, in a village by the sea, there lived a fisherman who", 18),
    ("The", 40),
    ("Every morning the baker opened the shop and", 10),
    ("It was", 25),
]


def test_greedy_text_through_joins_and_departures_matches_one_prompt_at_a_time(gpt2_folder, tight_layers):
    tokenizer = load_tokenizer(gpt2_folder)
    model = AutoModelForCausalLM.from_pretrained(gpt2_folder, local_files_only=True).eval()
    scheduler = GenerationScheduler(model, tokenizer, max_batch_size=4, name="kv-cache")
    try:
        finished = {index: threading.Event() for index in range(len(PROMPTS))}

        def emit(event: TokenEvent) -> None:
            if event.finish_reason is not None:
                finished[event.index].set()

        sequences = [
            Sequence(
                index,
                tokenizer(prompt, add_special_tokens=False)["input_ids"],
                SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0),
                emit,
            )
            for index, (prompt, max_tokens) in enumerate(PROMPTS)
        ]
        # Two start together; the rest arrive while they run (the long prompt is wider than the running batch), and
        # more than max_batch_size are waiting, so rows leave, others take their places and the batch goes on.
        scheduler.submit(sequences[:2])
        deadline = time.monotonic() + 30
        while len(sequences[0].generated_ids) < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        for sequence in sequences[2:]:
            scheduler.submit([sequence])
        for index, event in finished.items():
            assert event.wait(60), f"sequence {index} did not finish"
    finally:
        scheduler.close()

    for sequence in sequences:
        expected = _greedy_alone(model, sequence.prompt_ids, sequence.params.max_tokens, tokenizer.eos_token_id)
        assert sequence.generated_ids == expected[: len(sequence.generated_ids)]
        assert len(sequence.generated_ids) == len(expected) or sequence.generated_ids[-1] == tokenizer.eos_token_id
