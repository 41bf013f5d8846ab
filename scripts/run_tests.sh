#!/usr/bin/env bash
# Fresh-machine test command (README): make a venv, install the pinned CPU stack, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements-ci.txt
.venv/bin/pip install -q --no-deps -e .
exec .venv/bin/python -m pytest -q "$@"
