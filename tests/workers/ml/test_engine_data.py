"""The engine's data path: tokenized examples are cached and reused, and give exactly the rows of a fresh run."""

from tests.workers.ml.engine_fixtures import Recorder as _Recorder
from workers.ml.config import TrainingConfig
from workers.ml.data.samples import write_sample_datasets
from workers.ml.engine import run_training


def test_tokenized_cache_is_reused_and_changes_nothing(tmp_path):
    samples = write_sample_datasets(str(tmp_path / "samples"))
    common = {"train_file": samples["chat.jsonl"], "max_steps": 3, "log_every_steps": 1, "device": "cpu"}
    runs = []
    for name, cache in (("fresh", None), ("first", tmp_path / "cache"), ("second", tmp_path / "cache")):
        recorder = _Recorder()
        config = TrainingConfig.from_dict(
            {**common, "output_dir": str(tmp_path / name), "tokenized_cache_dir": str(cache) if cache else None}
        )
        run_training(config, recorder)
        runs.append(recorder)
    hits = [
        [
            event.data["tokenized_cache_hit"]
            for event in run.events
            if event.data and "tokenized_cache_hit" in event.data
        ]
        for run in runs
    ]
    assert hits == [[], [False], [True]]
    losses = [[event.data["train_loss"] for event in run.events if event.type == "metrics"] for run in runs]
    assert losses[0] == losses[1] == losses[2] and len(losses[0]) == 3
    # A different max_length is a different tokenization: not served from the entry above.
    recorder = _Recorder()
    run_training(
        TrainingConfig.from_dict(
            {
                **common,
                "output_dir": str(tmp_path / "other"),
                "tokenized_cache_dir": str(tmp_path / "cache"),
                "max_length": 64,
            }
        ),
        recorder,
    )
    assert [
        event.data["tokenized_cache_hit"]
        for event in recorder.events
        if event.data and "tokenized_cache_hit" in event.data
    ] == [False]


def test_plain_text_paragraphs_are_documents_and_few_documents_hold_out_lines(tmp_path):
    from workers.ml.data.training_sets import read_example_sets

    text = tmp_path / "story.txt"
    text.write_text("First line.\nSecond line.\n\nAnother paragraph\nwith two lines.\n\n\nLast one.\n")
    sets = read_example_sets(TrainingConfig(train_file=str(text), output_dir="-"), _Recorder())
    assert [example.fields["text"] for example in sets.train] == [
        "First line.\nSecond line.",
        "Another paragraph\nwith two lines.",
        "Last one.",
    ]
    lines = tmp_path / "lines.txt"
    lines.write_text("".join(f"line number {index}\n" for index in range(40)))
    split = read_example_sets(
        TrainingConfig(train_file=str(lines), output_dir="-", validation_fraction=0.25), _Recorder()
    )
    held_out = [line for document in split.validation for line in document.fields["text"].split("\n")]
    kept = [line for document in split.train for line in document.fields["text"].split("\n")]
    assert len(held_out) == 10 and len(kept) == 30 and not set(held_out) & set(kept)
