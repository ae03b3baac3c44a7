#!/bin/sh
# Install edgefl on a Raspberry Pi OS / Debian machine and run it as a systemd service.
#
#   sudo sh device/install.sh [--aggregator | --serve-only] [SOURCE]   install, or upgrade
#   sudo sh device/install.sh --uninstall [--purge]                    remove
#
# SOURCE is an edgefl checkout (default: the one this script lives in) or a wheel
# (edgefl-*.whl). Without an option this sets up the device agent (edgefl-device.service) with
# a CPU-only torch, to train; with --serve-only the same agent without torch: it serves the
# deployed ONNX model (ONNX Runtime, numpy, paho-mqtt) in a far smaller venv, and declines
# training. With --aggregator: the aggregator service (edgefl-aggregator.service) and its extras.
# Safe to run again: it upgrades edgefl, restarts a running service, and never touches a
# configuration file that exists already.
#
#   /opt/edgefl/venv                   virtual environment holding edgefl and torch
#   /etc/edgefl/device.toml            configuration, 0640 root:edgefl (it holds the broker
#   /etc/edgefl/aggregator.toml          password); created from the example only if missing
#   /var/lib/edgefl                    home of the system user edgefl; state in device/ and
#                                        aggregator/ below it
#   /etc/systemd/system/edgefl-device.service, edgefl-aggregator.service
#
# --uninstall stops and disables the services and removes /opt/edgefl and the unit files; it
# keeps /etc/edgefl and /var/lib/edgefl (configuration, models, checkpoints) unless --purge is
# given too. The system user edgefl is kept either way (`userdel edgefl` removes it).
#
# Environment:
#   TORCH_SPEC     pip arguments that install torch, used as given. Default: the range that
#                  pyproject.toml allows for the machine. On aarch64 that is torch 2.10 from
#                  PyPI, the newest CPU-only aarch64 wheel there (2.11 and later pull gigabytes
#                  of CUDA libraries); on x86_64 the CPU-only build from
#                  https://download.pytorch.org/whl/cpu, since PyPI's x86_64 torch pulls CUDA
#                  too. Before downloading, the install lists what pip would fetch, and it
#                  stops if that default would bring CUDA packages. Examples:
#                    TORCH_SPEC='torch==2.5.1 --index-url https://download.pytorch.org/whl/cpu'
#                    TORCH_SPEC=/media/usb/torch-2.5.1-cp311-cp311-linux_aarch64.whl
#                  Set it empty to let pip choose torch together with edgefl's other packages.
#   PIP_EXTRA      more pip arguments for every install step, e.g. '--no-cache-dir' on a small
#                  SD card, or '--no-index --find-links /media/usb/wheels' for an offline device
#   PYTHON         interpreter the virtual environment is made from (default: python3, 3.11+)
#   EDGEFL_PREFIX  install below this directory instead of / (PREFIX/opt/edgefl,
#                  PREFIX/etc/edgefl, PREFIX/var/lib/edgefl, PREFIX/etc/systemd/system), with
#                  the paths inside the installed unit and configuration rewritten to match.
#                  No root needed: it creates no user, runs no apt-get, chown or systemctl.
#                  For packaging tests, and for trying the installer out.
set -eu

# The torch ranges of pyproject.toml's [train] extra (tests/test_packaging.py keeps them the same).
TORCH_RANGE='torch>=2.2,<2.14'
TORCH_RANGE_AARCH64='torch>=2.2,<2.11'
TORCH_CPU_INDEX='https://download.pytorch.org/whl/cpu'
USER_NAME=edgefl

say() { printf '%s\n' "edgefl install: $*"; }
die() {
    printf '%s\n' "edgefl install: error: $*" >&2
    exit 1
}

usage() {
    # the comment at the top of this file
    sed -n '2,/^set -eu/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

# -- arguments -------------------------------------------------------------------------------

all_args=$*
role=device
serve_only=no
action=install
purge=no
source_arg=
while [ $# -gt 0 ]; do
    case "$1" in
        --aggregator) role=aggregator ;;
        --serve-only) serve_only=yes ;;
        --uninstall) action=uninstall ;;
        --purge) action=uninstall; purge=yes ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *)
            [ -z "$source_arg" ] || die "give at most one SOURCE (got $source_arg and $1)"
            source_arg=$1
            ;;
    esac
    shift
done

here=$(cd "$(dirname "$0")" && pwd)
if [ "$serve_only" = yes ] && [ "$role" = aggregator ]; then
    die "--serve-only is for a device; the aggregator needs torch"
fi

prefix=${EDGEFL_PREFIX:-}
if [ -n "$prefix" ]; then
    case "$prefix" in
        /*) ;;
        *) prefix=$(pwd)/$prefix ;;
    esac
    # no trailing slash, so that "$prefix/opt" has no double slash to rewrite later
    prefix=$(printf '%s' "$prefix" | sed 's:/*$::')
    [ -n "$prefix" ] || die "EDGEFL_PREFIX=/ is the same as no prefix; unset it instead"
    case "$prefix" in
        *[:\&]* | *\\*) die "EDGEFL_PREFIX may not contain ':', '&' or '\\'" ;;
    esac
fi

OPT_DIR=$prefix/opt/edgefl
VENV=$OPT_DIR/venv
ETC_DIR=$prefix/etc/edgefl
STATE_ROOT=$prefix/var/lib/edgefl
UNIT_DIR=$prefix/etc/systemd/system

systemd_running() {
    [ -z "$prefix" ] && [ -d /run/systemd/system ]
}

# -- uninstall -------------------------------------------------------------------------------

if [ "$action" = uninstall ]; then
    if [ -z "$prefix" ] && [ "$(id -u)" -ne 0 ]; then
        die "run as root: sudo sh $0 --uninstall"
    fi
    for unit in edgefl-device edgefl-aggregator; do
        if systemd_running; then
            systemctl disable --now "$unit.service" >/dev/null 2>&1 || true
        fi
        if [ -e "$UNIT_DIR/$unit.service" ]; then
            rm -f "$UNIT_DIR/$unit.service"
            say "removed $UNIT_DIR/$unit.service"
        fi
    done
    if systemd_running; then
        systemctl daemon-reload
    fi
    if [ -e "$OPT_DIR" ]; then
        rm -rf "$OPT_DIR"
        say "removed $OPT_DIR"
    fi
    if [ "$purge" = yes ]; then
        rm -rf "$ETC_DIR" "$STATE_ROOT"
        say "removed $ETC_DIR and $STATE_ROOT"
    else
        say "kept $ETC_DIR and $STATE_ROOT (--purge removes them)"
    fi
    exit 0
fi

# -- checks ----------------------------------------------------------------------------------

if [ -z "$prefix" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root: sudo sh $0${all_args:+ $all_args} (or set EDGEFL_PREFIX to try it out below a directory)"
fi

source_arg=${source_arg:-$here/..}
if [ -d "$source_arg" ]; then
    source_kind=checkout
    source_path=$(cd "$source_arg" && pwd)
    [ -f "$source_path/pyproject.toml" ] || die "$source_path is not an edgefl checkout (no pyproject.toml)"
elif [ -f "$source_arg" ]; then
    case "$source_arg" in
        *.whl) ;;
        *) die "$source_arg is neither a checkout directory nor a wheel (.whl)" ;;
    esac
    source_kind=wheel
    source_path=$(cd "$(dirname "$source_arg")" && pwd)/$(basename "$source_arg")
else
    die "$source_arg does not exist"
fi

PYTHON=${PYTHON:-python3}

# Debian splits venv and pip out of python3; without them `python3 -m venv` fails half-way.
if [ -z "$prefix" ] && command -v dpkg-query >/dev/null 2>&1; then
    missing=
    for pkg in python3 python3-venv python3-pip; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
            missing="$missing $pkg"
        fi
    done
    if [ -n "$missing" ]; then
        say "installing$missing with apt-get"
        # env, not export: the variable must reach apt-get even from a sudo'd shell
        env DEBIAN_FRONTEND=noninteractive apt-get update
        # shellcheck disable=SC2086  # one word per package
        env DEBIAN_FRONTEND=noninteractive apt-get install -y $missing
    fi
fi

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON to a Python 3.11+)"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    die "edgefl needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -V 2>&1). On Raspberry Pi OS" \
        "that means Bookworm (12) or newer."
fi
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
    || die "$PYTHON cannot make virtual environments; install python3-venv"

# What pip sees: a 32-bit Python on a 64-bit kernel (32-bit Raspberry Pi OS on a Pi 4/5)
# reports aarch64 from uname but needs armv7 wheels.
machine=$(uname -m)
bits=$("$PYTHON" -c 'import struct; print(struct.calcsize("P") * 8)')
case "$machine/$bits" in
    x86_64/64 | amd64/64) arch=x86_64 ;;
    aarch64/64 | arm64/64) arch=aarch64 ;;
    aarch64/32 | arm64/32 | armv*) arch=arm32 ;;
    *) arch=$machine ;;
esac

if [ "$serve_only" = yes ]; then
    torch_args=
elif [ "${TORCH_SPEC+set}" = set ]; then
    torch_args=$TORCH_SPEC
elif [ "$arch" = x86_64 ]; then
    torch_args="$TORCH_RANGE --index-url $TORCH_CPU_INDEX"
elif [ "$arch" = arm32 ]; then
    die "this is a 32-bit ARM system ($machine, $bits-bit Python). PyPI has no torch or" \
        "onnxruntime wheels for it: install the 64-bit Raspberry Pi OS (Pi 3, 4, 5, Zero 2)," \
        "or set TORCH_SPEC to a torch wheel you built for it."
elif [ "$arch" = aarch64 ]; then
    torch_args=$TORCH_RANGE_AARCH64
else
    torch_args=$TORCH_RANGE
fi
PIP_EXTRA=${PIP_EXTRA:-}

# -- user and directories --------------------------------------------------------------------

if [ -z "$prefix" ]; then
    if ! id -u "$USER_NAME" >/dev/null 2>&1; then
        useradd --system --user-group --home-dir /var/lib/edgefl --no-create-home \
            --shell /usr/sbin/nologin --comment "edgefl federated learning" "$USER_NAME"
        say "created the system user $USER_NAME"
    fi
fi

# make_dir PATH MODE OWNER:GROUP
make_dir() {
    mkdir -p "$1"
    chmod "$2" "$1"
    if [ -z "$prefix" ]; then
        chown "$3" "$1"
    fi
}

make_dir "$OPT_DIR" 0755 root:root
make_dir "$ETC_DIR" 0755 root:root
make_dir "$STATE_ROOT" 0750 "$USER_NAME:$USER_NAME"
make_dir "$STATE_ROOT/$role" 0750 "$USER_NAME:$USER_NAME"

# -- virtual environment and packages ---------------------------------------------------------

# A venv whose interpreter is gone (e.g. after an OS upgrade replaced python3.11) is rebuilt.
if [ -e "$VENV" ] && ! "$VENV/bin/python" -c '' >/dev/null 2>&1; then
    say "the virtual environment in $VENV is broken; making it again"
    rm -rf "$VENV"
fi
if [ ! -e "$VENV/bin/python" ]; then
    say "creating a virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi
venv_pip_install() {
    # shellcheck disable=SC2086  # PIP_EXTRA is a list of arguments
    "$VENV/bin/python" -m pip --disable-pip-version-check install $PIP_EXTRA "$@"
}

if [ -n "$torch_args" ]; then
    # torch is the big download: say what it brings before fetching it
    # shellcheck disable=SC2086  # TORCH_SPEC is a list of arguments
    plan=$(venv_pip_install --dry-run $torch_args) || die "pip cannot install $torch_args"
    fetch=$(printf '%s\n' "$plan" | sed -n 's/^Would install //p')
    say "pip install $torch_args will install: ${fetch:-nothing new}"
    if [ "${TORCH_SPEC+set}" != set ] && printf '%s\n' "$fetch" | grep -Eq '(^| )(nvidia-|triton-)'; then
        die "the default torch for $arch would bring CUDA packages, which a device cannot use;" \
            "set TORCH_SPEC to a CPU-only torch"
    fi
    say "installing torch"
    # shellcheck disable=SC2086  # TORCH_SPEC is a list of arguments
    venv_pip_install $torch_args
elif [ "$serve_only" = yes ]; then
    say "serve-only: no torch; the agent serves the deployed model and declines training"
fi

# pip builds a checkout inside it (build/, edgefl.egg-info/); as root that would leave
# root-owned files in the user's working tree, so it builds a copy instead.
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
trap 'exit 130' INT TERM
if [ "$source_kind" = checkout ]; then
    "$PYTHON" -c '
import shutil, sys
skip = shutil.ignore_patterns(".*", "build", "dist", "runs", "*.egg-info", "__pycache__")
shutil.copytree(sys.argv[1], sys.argv[2], ignore=skip)
' "$source_path" "$workdir/edgefl"
    package=$workdir/edgefl
else
    package=$source_path
fi
if [ "$role" = aggregator ]; then
    extras='[aggregator]'
elif [ "$serve_only" = yes ]; then
    extras=
else
    extras='[train]'
fi
say "installing edgefl$extras from $source_path"
# --upgrade replaces an installed edgefl of the same version too; the default upgrade strategy
# (only-if-needed) keeps the torch installed above, as long as it is in edgefl's range.
venv_pip_install --upgrade "$package$extras"
if [ "$source_kind" = wheel ]; then
    # pip skips a wheel whose version is installed already, even if it was rebuilt since
    venv_pip_install --force-reinstall --no-deps "$package"
fi

installed() {
    # where the installed package $1 lives: its unit file and example configuration come from
    # there, so they always match the installed code
    "$VENV/bin/python" -c "import $1, os; print(os.path.dirname($1.__file__))"
}
version=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("edgefl"))')

# Paths in the shipped unit and configuration are the real ones; below a prefix they move along.
relocate() {
    if [ -n "$prefix" ]; then
        sed -e "s:/opt/edgefl:$OPT_DIR:g" -e "s:/etc/edgefl:$ETC_DIR:g" \
            -e "s:/var/lib/edgefl:$STATE_ROOT:g" "$1"
    else
        cat "$1"
    fi
}

# -- configuration ---------------------------------------------------------------------------

config=$ETC_DIR/$role.toml
if [ "$role" = device ]; then
    example=$(installed device)/device.example.toml
    config_class=DeviceConfig
else
    # configs/ is not part of the wheel: take the checkout's, else the one beside this script
    example=$source_path/configs/aggregator.example.toml
    [ -f "$example" ] || example=$here/../configs/aggregator.example.toml
    config_class=AggregatorConfig
fi

if [ -e "$config" ]; then
    say "keeping the existing $config"
else
    [ -f "$example" ] || die "no example configuration found at $example"
    # written under a temporary name and moved: a half-written file never holds the real name
    relocate "$example" >"$config.new"
    chmod 0640 "$config.new"
    if [ -z "$prefix" ]; then
        chown "root:$USER_NAME" "$config.new"
    fi
    mv "$config.new" "$config"
    say "wrote $config from $(basename "$example")"
fi
# An upgrade may have renamed or removed a key; say so now rather than at the service's start.
if ! problem=$("$VENV/bin/python" -c "
import sys
from edgefl.config import $config_class, ConfigError, load
try:
    load($config_class, sys.argv[1])
except ConfigError as e:
    print(e)
    sys.exit(1)
" "$config"); then
    say "warning: edgefl $version cannot read $config: $problem"
fi

# -- systemd unit ----------------------------------------------------------------------------

unit=edgefl-$role.service
make_dir "$UNIT_DIR" 0755 root:root
unit_src=$(installed "$role")/$unit
relocate "$unit_src" >"$UNIT_DIR/$unit.new"
chmod 0644 "$UNIT_DIR/$unit.new"
mv "$UNIT_DIR/$unit.new" "$UNIT_DIR/$unit"
say "installed $UNIT_DIR/$unit"

if systemd_running; then
    systemctl daemon-reload
    systemctl --quiet enable "$unit"
    # an upgrade takes effect at once if the service was running; a stopped one stays stopped
    systemctl try-restart "$unit"
    say "enabled $unit (it starts at boot)"
elif [ -z "$prefix" ]; then
    say "systemd is not running here: enable $unit yourself once it is"
fi

# -- next steps ------------------------------------------------------------------------------

# start_steps UNIT ROLE: how to start what was installed
start_steps() {
    if [ -n "$prefix" ]; then
        echo "  2. $VENV/bin/edgefl $2 --config $config"
    else
        echo "  2. sudo systemctl start $1"
        echo "  3. journalctl -u $1 -f"
    fi
}

say "edgefl $version is installed in $VENV"
if [ "$role" = device ]; then
    cat <<EOF

Next steps:
  1. Replace $config with the file that
       \`edgefl enroll <device id> --dir <broker dir> --fleet <fleet> --host <broker address>\`
     wrote on the broker's machine (it holds fleet, device_id and the broker account), or edit:
       fleet             the broker's --fleet
       device_id         this device's name (a-z, 0-9, '_', '-')
       [broker] host     the broker's address
       [broker] username the device id again, and its enrolment password
       data              your training data (.npz with X and y), readable by user $USER_NAME,
                         e.g. sudo install -o $USER_NAME -g $USER_NAME -m 0640 data.npz $STATE_ROOT/data.npz
                         (the service cannot see /home)
EOF
    start_steps edgefl-device device
else
    cat <<EOF

Next steps:
  1. Edit $config:
       fleet             the broker's --fleet
       [broker] host     the broker's address
       [broker] password the contents of aggregator.secret in the broker's directory
       eval_data         optional held-out data (.npz) below $STATE_ROOT
EOF
    start_steps edgefl-aggregator aggregator
fi
