"""``python -m workers.serving --port 8100``: the serving process under uvicorn (what localrun starts)."""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from workers.serving.app import create_app
from workers.serving.config import ServingConfig
from workers.serving.placement import advertised_url_mismatch


def main() -> None:
    parser = argparse.ArgumentParser(description="Tunehouse serving process")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--log-level", default="info")
    arguments = parser.parse_args()
    logging.basicConfig(level=arguments.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServingConfig.from_env(port=arguments.port, host=arguments.host)
    mismatch = advertised_url_mismatch(config.advertised_url, os.environ.get("SERVING_URL", ""))
    if mismatch:
        logging.getLogger("workers.serving").warning("Warm replicas: %s", mismatch)
    app = create_app(config)
    uvicorn.run(app, host=arguments.host, port=arguments.port, log_level=arguments.log_level, lifespan="on")


if __name__ == "__main__":
    main()
