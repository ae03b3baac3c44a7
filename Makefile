# Two commands a user needs: `make demo` and `make test`. Each does its own set-up:
# Mosquitto (apt on Debian / Raspberry Pi OS), a virtual environment and the packages, and the
# data sets beyond the bundled digits; `make test` also Chromium (apt), for the dashboard's
# browser test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgefl-installed
# The CPU build of torch that installs from this machine's disk; pyproject.toml's [train] extra
# keeps a range, and on aarch64 (a Raspberry Pi) a narrower one, of CPU-only wheels.
TORCH  ?= torch==2.13.0
CONFIG ?= configs/b1.toml

.PHONY: setup mosquitto chromium datasets demo test unit lint bench clean

setup: mosquitto $(STAMP) datasets

mosquitto:
	@sh broker/install-mosquitto.sh

# Debian's Chromium, driven by Playwright (the dev extra) in tests/test_dashboard.py
chromium:
	@sh monitor/install-chromium.sh

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "edgefl needs Python 3.11 or newer"'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist (apt, like Mosquitto), and the smartwatch set
# converted once from seglearn 1.2.5's wheel into <venv>/share/edgefl/watch.npz (edgefl/data/).
# Both steps return at once when already done.
datasets: $(STAMP)
	@sh edgefl/data/install-fashion-mnist.sh
	@$(BIN)/python -m edgefl.data.watch_setup

demo: setup
	$(BIN)/edgefl demo --config $(CONFIG)

test: setup chromium lint
	$(BIN)/python -m pytest -q

# the unit tests alone, in seconds: no broker, nothing slow
unit: setup
	$(BIN)/python -m pytest -q -m "not broker and not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python -m benchmarks.b1_digits

# A release check, not part of `make test` (minutes; root): device/install.sh and the agent on
# an emulated Raspberry Pi (arm64 Debian under qemu-user). See benchmarks/pi_check.py.
.PHONY: pi-check
pi-check: setup
	$(BIN)/python -m benchmarks.pi_check

clean:
	rm -rf $(VENV) runs .pytest_cache
