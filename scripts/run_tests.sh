#!/usr/bin/env bash
# The test suite: set up (first run only), lint (ruff, configured in pyproject.toml), then pytest. Extra arguments go to pytest
# (e.g. -m "not slow", -k galore). No network is used: hub and wandb access are switched off.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TRITON_INTERPRET=1
.venv/bin/python -m ruff check --quiet .
exec .venv/bin/python -m pytest "$@"
