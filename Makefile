# Quick start: `make run` (serve on the embedded defaults) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JS_DIR := tests/js
JS_STAMP := $(JS_DIR)/node_modules/.installed

.PHONY: run test lint bench bench-smoke lock clean setup

setup: $(STAMP)

# The virtualenv, installed from the lock file (constraints.txt); redone when it changes.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r constraints.txt
	touch $@

$(JS_STAMP): $(JS_DIR)/package.json $(JS_DIR)/package-lock.json
	cd $(JS_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

run: $(STAMP)
	$(BIN)/python run.py

test: $(STAMP) $(JS_STAMP)
	bash scripts/setup_mongoeco.sh
	bash scripts/setup_redis.sh
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP) $(JS_STAMP)
	$(BIN)/python -m bench.run --full

bench-smoke: $(STAMP)
	$(BIN)/python -m bench.run --smoke

# Re-resolve the lock from pyproject.toml's ranges (run after changing dependencies).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --disable-pip-version-check '.[dev,binary]' && .lock-venv/bin/pip uninstall -y -q aichat-stream
	.lock-venv/bin/pip freeze --exclude-editable | grep -v '^aichat-stream' > constraints.txt
	rm -rf .lock-venv build *.egg-info

clean:
	rm -rf $(VENV) .mongo-venv $(JS_DIR)/node_modules
