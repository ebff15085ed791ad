#!/usr/bin/env bash
# The README's test command: sets up .venv on a fresh machine (pinned versions), then ruff (lint and format),
# lint-imports and pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh .venv all dev,pusht
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports  # the layers of docs/architecture.md ([tool.importlinter] in pyproject.toml)
.venv/bin/python -m pytest -q "$@"
