#!/usr/bin/env bash
# Install locod with its test extra into a virtual environment, fetch the embedded model, then lint,
# type-check and run the whole test suite. LOCOD_VENV picks the environment (default: .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LOCOD_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# A regular (not editable) install, so the tests also prove the package layout works once installed.
"$venv/bin/python" -m pip install --quiet '.[test]'
"$venv/bin/locod" models fetch --dir models
"$venv/bin/python" -m ruff check .
# The installed package, as users import it: one name per module (checking the folders api/, daemon/,
# policy/ by path would see daemon.turn.Turn and locod.daemon.turn.Turn as two classes).
"$venv/bin/python" -m mypy -p locod
"$venv/bin/python" -m pytest "$@"
