#!/bin/sh
# Make sure Debian's chromium exists for the dashboard's browser tests (tests/dashboard/):
# install it with apt-get when we are root, otherwise say exactly what to run. Playwright
# drives this binary by path; it never downloads a browser of its own. Used by `make test`.
# Never fails the build: without a browser those tests skip, loudly, naming this script.
set -u
CHROMIUM="${SETPOINT_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ] || command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setpoint: installing chromium with apt-get (for the dashboard's browser tests)" >&2
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
        || { apt-get update >/dev/null 2>&1 \
             && apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; }; then
        exit 0
    fi
    echo "setpoint: WARNING: apt-get could not install chromium; the browser tests will be SKIPPED" >&2
    exit 0
fi
echo "setpoint: WARNING: no chromium, so the dashboard's browser tests will be SKIPPED." >&2
echo "    Install it with: sudo apt-get install -y chromium" >&2
exit 0
