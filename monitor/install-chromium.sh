#!/bin/sh
# Make sure Debian's Chromium is installed: the dashboard's end-to-end test (tests/
# test_dashboard.py) drives it headless through Playwright. Playwright's own browser download
# is never used (it fetches a build from outside the package registries); the Python package
# comes with the dev extra in pyproject.toml.
#
# Safe to run again: does nothing when Chromium is already there. EDGEFL_CHROMIUM names another
# binary (the test reads it too).
set -eu

CHROMIUM="${EDGEFL_CHROMIUM:-/usr/bin/chromium}"

report() {
    version=$("$CHROMIUM" --version 2>/dev/null || true)
    echo "chromium: $CHROMIUM (${version:-version unknown})"
}

if [ -x "$CHROMIUM" ]; then
    report
    exit 0
fi

if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=""
    elif command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "Chromium is missing and installing it needs root: run as root" \
             "apt-get install chromium" >&2
        exit 1
    fi
    echo "Installing Chromium with apt-get (for the dashboard's browser test) ..."
    # env, not an exported variable: sudo would drop it on the way.
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
    if [ -x "$CHROMIUM" ]; then
        report
        exit 0
    fi
    echo "apt-get finished but there is no $CHROMIUM" >&2
    exit 1
fi

cat >&2 <<'MSG'
Chromium is not installed, and this script only knows apt-get. Install Chromium with your
system's package manager, then set EDGEFL_CHROMIUM to its path if it is not /usr/bin/chromium.
MSG
exit 1
