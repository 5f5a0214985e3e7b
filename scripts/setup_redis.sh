#!/usr/bin/env bash
# Prepare the redis-server the cluster tests start: Debian's `redis-server` package,
# installed with apt-get when missing and running as root. Idempotent; does nothing when
# REDIS_TEST_URL points at a Redis the tests may use.
set -euo pipefail

MISSING="the cluster tests need redis-server (Debian: \`apt-get install redis-server\`, run as root) or REDIS_TEST_URL pointing at a Redis"

if [[ -n "${REDIS_TEST_URL:-}" ]]; then
    exit 0
fi
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if [[ "$(id -u)" != "0" ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "$MISSING" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
install() {
    apt-get install -y -q --no-install-recommends redis-server >/dev/null
}
# a fresh image has no package lists: update only when the plain install fails
if ! install; then
    apt-get update -q >/dev/null
    install
fi
# the package's own service is not wanted: the tests start their own servers
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
echo "$MISSING" >&2
exit 1
