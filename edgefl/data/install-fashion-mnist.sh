#!/bin/sh
# Make sure Fashion-MNIST is installed: Debian's dataset-fashion-mnist package puts its four IDX
# files under /usr/share/datasets/fashion-mnist/ (edgefl/data/fashion_mnist.py reads them).
# Only configs/fmnist.toml, its benchmark and its tests need it.
#
# Safe to run again: does nothing when the files are there. Without apt-get it prints what to
# do and leaves the rest of the set-up to go on (the digits demo does not need it).
set -eu

DIR="${EDGEFL_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"

installed() {
    [ -f "$DIR/train-images-idx3-ubyte.gz" ] || [ -f "$DIR/train-images-idx3-ubyte" ]
}

if installed; then
    echo "fashion-mnist: $DIR"
    exit 0
fi

if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=""
    elif command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "Fashion-MNIST is missing and installing it needs root: run as root" \
             "apt-get install dataset-fashion-mnist" >&2
        exit 1
    fi
    echo "Installing Fashion-MNIST (dataset-fashion-mnist, 30 MB) with apt-get ..."
    # env, not an exported variable: sudo would drop it on the way. Try without refreshing the
    # package lists first (quick); a fresh machine that has none needs the update.
    if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist; then
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist
    fi
    if installed; then
        echo "fashion-mnist: $DIR"
        exit 0
    fi
    echo "apt-get finished but $DIR holds no Fashion-MNIST files" >&2
    exit 1
fi

cat >&2 <<EOF2
warning: Fashion-MNIST is not installed (configs/fmnist.toml needs it), and this script only
knows apt-get. On Debian or Ubuntu: sudo apt-get install dataset-fashion-mnist. Elsewhere, put
the four IDX files of Fashion-MNIST (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a folder and set
EDGEFL_FASHION_MNIST_DIR to it.
EOF2
exit 0
