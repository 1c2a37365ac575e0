"""The command line of the training engine: ``python -m workers.ml.train CONFIG.json``.

It reads a `workers.ml.config.TrainingConfig` from a JSON file, runs `workers.ml.engine.run_training` (any task and
mode), prints the events as JSON lines on stdout, then one ``{"type": "result", ...}`` line. A user error
(`TrainingDataError`) is printed as one error event and exits with status 1. No Django.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from workers.ml.callbacks import JsonLinesCallback, TrainingEvent
from workers.ml.config import TrainingConfig
from workers.ml.errors import TrainingDataError


def main(argv: list[str] | None = None) -> int:
    """Run one training (`workers.ml.engine.run_training`) from a JSON config file, printing events and a final
    result as JSON lines on stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m workers.ml.train",
        description="Train a model (any task and mode of the engine); events and the result go to stdout as JSON "
        "lines.",
    )
    parser.add_argument("config", help="JSON file with the fields of workers.ml.config.TrainingConfig")
    arguments = parser.parse_args(argv)
    output = JsonLinesCallback(sys.stdout)
    # Imported here: the engine pulls in peft and scikit-learn, which this module's own users never need.
    from workers.ml.engine import run_training

    try:
        config = TrainingConfig.from_dict(_read_config_file(arguments.config))
        result = run_training(config, output)
    except TrainingDataError as error:
        output.on_event(TrainingEvent(level="error", message=error.message, data=error.to_dict()))
        return 1
    output.write_line({"type": "result", **dataclasses.asdict(result)})
    return 0


def _read_config_file(path: str) -> dict[str, object]:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainingDataError("invalid_config", f"Could not read the configuration file {path}: {error}") from error


if __name__ == "__main__":
    raise SystemExit(main())
