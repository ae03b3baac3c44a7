#!/bin/sh
# Make sure the Mosquitto MQTT broker is installed. edgefl's tests, demo and benchmarks start a
# private Mosquitto of their own, so only the program is needed, not a running service.
#
# Safe to run again: does nothing when mosquitto is already there. A system service that the
# package starts is left alone (edgefl never uses it).
set -eu

find_mosquitto() {
    if [ -n "${EDGEFL_MOSQUITTO:-}" ] && [ -x "$EDGEFL_MOSQUITTO" ]; then
        echo "$EDGEFL_MOSQUITTO"
        return 0
    fi
    if command -v mosquitto >/dev/null 2>&1; then
        command -v mosquitto
        return 0
    fi
    # Debian installs the broker in /usr/sbin, which is not on an ordinary user's PATH.
    for dir in /usr/sbin /usr/local/sbin /usr/bin /usr/local/bin; do
        if [ -x "$dir/mosquitto" ]; then
            echo "$dir/mosquitto"
            return 0
        fi
    done
    return 1
}

report() {
    # "mosquitto -h" prints "mosquitto version X.Y.Z" first; it exits non-zero, hence "|| true".
    version=$("$1" -h 2>/dev/null | head -n 1 || true)
    echo "mosquitto: $1 (${version:-version unknown})"
    case "$version" in
        *"version 1."* | *"version 0."*)
            echo "warning: edgefl's broker configuration needs Mosquitto 2.0 or newer" >&2 ;;
    esac
}

if binary=$(find_mosquitto); then
    report "$binary"
    exit 0
fi

if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=""
    elif command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "Mosquitto is missing and installing it needs root: run as root" \
             "apt-get install mosquitto mosquitto-clients" >&2
        exit 1
    fi
    echo "Installing Mosquitto with apt-get ..."
    # env, not an exported variable: sudo would drop it on the way.
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto mosquitto-clients
    if binary=$(find_mosquitto); then
        report "$binary"
        exit 0
    fi
    echo "apt-get finished but no mosquitto binary was found" >&2
    exit 1
fi

cat >&2 <<'EOF'
The Mosquitto MQTT broker (2.0 or newer) is not installed, and this script only knows apt-get.
Install it with your system's package manager, for example:
  Fedora / RHEL:  sudo dnf install mosquitto
  Arch:           sudo pacman -S mosquitto
  Alpine:         sudo apk add mosquitto mosquitto-clients
  macOS:          brew install mosquitto
then make sure `mosquitto` is on PATH (or in /usr/sbin), or set EDGEFL_MOSQUITTO to its path.
EOF
exit 1
