# Quick start: `make run` (serve on the embedded defaults) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JS_DIR := tests/js
JS_STAMP := $(JS_DIR)/node_modules/.installed

BINARY_VENV := .binary-venv
BINARY_STAMP := $(BINARY_VENV)/.installed
SOURCES := run.py $(wildcard server/*.py handlers/*.py services/*.py services/*/*.py web/* web/*/*)

.PHONY: run test lint bench bench-smoke lock clean setup binary

setup: $(STAMP)

# The virtualenv, installed from the lock file (constraints.txt); redone when it changes.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r constraints.txt
	touch $@

$(JS_STAMP): $(JS_DIR)/package.json $(JS_DIR)/package-lock.json
	cd $(JS_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The one-file executable, built from a venv holding only the runtime dependencies.
$(BINARY_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(BINARY_VENV)
	$(BINARY_VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt '.[binary]'
	$(BINARY_VENV)/bin/pip uninstall --quiet -y aichat-stream
	rm -rf build *.egg-info
	touch $@

dist/aichat: $(BINARY_STAMP) packaging/aichat.spec $(SOURCES)
	$(BINARY_VENV)/bin/pyinstaller --noconfirm --clean --log-level WARN \
		--distpath dist --workpath build/pyinstaller packaging/aichat.spec

binary: dist/aichat

run: $(STAMP)
	$(BIN)/python run.py

test: $(STAMP) $(JS_STAMP) dist/aichat
	bash scripts/setup_mongoeco.sh
	bash scripts/setup_redis.sh
	bash scripts/setup_chromium.sh
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP) $(JS_STAMP)
	bash scripts/setup_redis.sh
	$(BIN)/python -m bench.run --full

bench-smoke: $(STAMP)
	bash scripts/setup_redis.sh
	$(BIN)/python -m bench.run --smoke

# Re-resolve the lock from pyproject.toml's ranges (run after changing dependencies).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --disable-pip-version-check '.[dev,binary]' && .lock-venv/bin/pip uninstall -y -q aichat-stream
	.lock-venv/bin/pip freeze --exclude-editable | grep -v '^aichat-stream' > constraints.txt
	rm -rf .lock-venv build *.egg-info

clean:
	rm -rf $(VENV) .mongo-venv $(BINARY_VENV) $(JS_DIR)/node_modules build dist
