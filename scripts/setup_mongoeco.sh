#!/usr/bin/env bash
# Prepare the MongoDB server the test suite runs against: mongoeco (an in-process MongoDB
# wire-protocol server) in its own venv, because it needs Python 3.13+ while the project
# runs on 3.11. Idempotent; does nothing when MONGODB_TEST_URI points at a real MongoDB.
set -euo pipefail

MONGOECO_VERSION="4.11.0"  # pinned: tests depend on what this version of mongoeco supports
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.mongo-venv"
MISSING="make test needs Python 3.13+ (for the mongoeco MongoDB test server) or MONGODB_TEST_URI pointing at a MongoDB; install one, e.g. \`pyenv install 3.13\`"

if [[ -n "${MONGODB_TEST_URI:-}" ]]; then
    exit 0
fi

installed_ok() {
    "$VENV/bin/python" - "$MONGOECO_VERSION" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version

import mongoeco.wire  # noqa: F401

sys.exit(0 if version("mongoeco") == sys.argv[1] else 1)
PY
}

if [[ -x "$VENV/bin/python" ]] && installed_ok; then
    exit 0
fi

# prints the real interpreter behind $1 (not a pyenv shim) when it is 3.13 or newer
is_new_enough() {
    "$1" -c 'import sys; assert sys.version_info >= (3, 13); print(sys.executable)' 2>/dev/null
}

find_python() {
    local candidate root version
    for candidate in python3.14 python3.13 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && is_new_enough "$candidate"; then
            return 0
        fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        root="$(pyenv root)"
        # newest first
        for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[3-9]|[2-9][0-9])' | sort -rV); do
            candidate="$root/versions/$version/bin/python"
            if [[ -x "$candidate" ]] && is_new_enough "$candidate"; then
                return 0
            fi
        done
    fi
    return 1
}

if ! PYTHON="$(find_python)"; then
    echo "$MISSING" >&2
    exit 1
fi

echo "setting up $VENV with $PYTHON ($("$PYTHON" --version 2>&1)) and mongoeco $MONGOECO_VERSION"
# --clear: a venv left half-built or made with an older Python is rebuilt from scratch
"$PYTHON" -m venv --clear "$VENV"
"$VENV/bin/python" -m pip install --quiet "mongoeco[wire]==$MONGOECO_VERSION"
if ! installed_ok; then
    echo "mongoeco $MONGOECO_VERSION installed in $VENV but \`import mongoeco.wire\` fails" >&2
    exit 1
fi
