#!/usr/bin/env bash
# Debian's chromium for the browser tests (tests/test_web_page.py drive it through Playwright
# with executable_path; Playwright's own browser download is not used).
# Installs it with apt-get when /usr/bin/chromium is missing and we run as root; otherwise
# says what to do and leaves the tests to report the missing browser.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "setup_chromium: $CHROMIUM is missing; install it with: sudo apt-get install chromium" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_chromium: $CHROMIUM is missing and apt-get is not available; install chromium" >&2
    exit 0
fi
echo "setup_chromium: installing Debian's chromium with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
test -x "$CHROMIUM"
