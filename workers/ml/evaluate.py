"""``python -m workers.ml.evaluate MODEL_DIR DATA_FILE``: evaluate a model the engine exported on any dataset of its
task and print the metrics and sample predictions as one JSON object (no Django, Redis or Celery)."""

from __future__ import annotations

import argparse
import json
import sys

from workers.ml.callbacks import JsonLinesCallback
from workers.ml.engine import evaluate_saved_model
from workers.ml.errors import TrainingDataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.ml.evaluate", description=__doc__)
    parser.add_argument("model_dir", help="folder written by a training run (holds training_report.json)")
    parser.add_argument("data_file", help="dataset of the model's task, in any format uploads accept")
    parser.add_argument("--data-filename", help="original name of the data file, when its path has another ending")
    parser.add_argument("--column-mapping", help='JSON such as {"text": "review", "label": "stars"}')
    parser.add_argument("--max-examples", type=int, default=200)
    parser.add_argument("--device", default="auto")
    arguments = parser.parse_args(argv)
    output = JsonLinesCallback(sys.stdout)
    try:
        mapping = json.loads(arguments.column_mapping) if arguments.column_mapping else None
        result = evaluate_saved_model(
            arguments.model_dir,
            arguments.data_file,
            data_filename=arguments.data_filename,
            column_mapping=mapping,
            max_examples=arguments.max_examples,
            device=arguments.device,
        )
    except (TrainingDataError, json.JSONDecodeError) as error:
        details = error.to_dict() if isinstance(error, TrainingDataError) else {"code": "invalid_column_mapping"}
        output.write_line({"type": "error", "message": str(error), "data": details})
        return 1
    output.write_line({"type": "evaluation", **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
