#!/usr/bin/env bash
# Debian's Chromium and its driver, for the search page's browser test
# (tests/test_web_browser.py): from apt, never a download.  Installed only
# where this runs as root with apt; elsewhere the test skips with the reason.
set -euo pipefail
if command -v chromedriver >/dev/null 2>&1 && { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing chromium and chromium-driver with apt for the browser test" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
else
    echo "note: no Chromium here; the browser test will skip (Debian: apt-get install chromium chromium-driver)" >&2
fi
